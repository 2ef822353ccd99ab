"""Charts of the speed benchmarks: bench/results/ffn-h200.png and e2e-h200.png from their JSON.

python bench/plot.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FFN_VARIANTS = (
    "dense-fused",
    "split-reference-lowrank-h0.10-b0.67",
    "lowrank-h0.10-b0.67",
    "lowrank-h0.20-b0.67",
    "lowrank-uniform-b0.67",
    "int4-h0.10",
)


def plot_ffn(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    rows = data["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(5 * len(tokens), 4.6), sharey=True)
    width = 0.8 / len(FFN_VARIANTS)
    for ax, t in zip(axes, tokens, strict=True):
        for i, variant in enumerate(FFN_VARIANTS):
            values = []
            for shape in shapes:
                match = [
                    r
                    for r in rows
                    if r["shape"] == shape and r["tokens"] == t and r["variant"] == variant
                ]
                values.append(match[0]["speedup"] if match else 0.0)
            xs = [j + (i - len(FFN_VARIANTS) / 2 + 0.5) * width for j in range(len(shapes))]
            ax.bar(xs, values, width, label=variant)
        roof = []
        for shape in shapes:
            match = [
                r
                for r in rows
                if r["shape"] == shape
                and r["tokens"] == t
                and r["variant"] == "lowrank-h0.10-b0.67"
            ]
            roof.append(match[0]["roofline_speedup"] if match else 0.0)
        ax.scatter(
            range(len(shapes)),
            roof,
            marker="_",
            s=600,
            color="black",
            zorder=3,
            label="roofline (lowrank-h0.10-b0.67)",
        )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(shapes)), shapes, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{t} token{'s' if t > 1 else ''}")
    axes[0].set_ylabel("speedup over dense bf16 FFN")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"FFN layer, {data['machine'].get('device', '?')}, bf16, CUDA graphs")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_e2e(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    models = data["models"]
    names = list(models)
    metrics = ("prefill_speedup", "decode_speedup_b1", "decode_speedup_b16")
    fig, ax = plt.subplots(figsize=(10, 5.4))
    width = 0.8 / (len(metrics) + 2)
    for i, metric in enumerate(metrics):
        xs = [j + (i - 2) * width for j in range(len(names))]
        ax.bar(xs, [models[n].get(metric) or 0 for n in names], width, label=metric)
    compiled = data.get("compiled_decode", {}).get("models", {})
    for k, metric in enumerate(("decode_speedup_b1", "decode_speedup_b16")):
        xs = [j + (len(metrics) - 2 + k) * width for j in range(len(names))]
        ax.bar(
            xs,
            [compiled.get(n, {}).get(metric) or 0 for n in names],
            width,
            hatch="//",
            label=f"{metric} (torch.compile loop)",
        )
    ax.axhline(1.25, color="tab:blue", ls="--", lw=0.8, label="target prefill 1.25x")
    ax.axhline(1.5, color="tab:orange", ls="--", lw=0.8, label="target decode b1 1.5x")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("speedup, compressed (43.1% smaller) over dense")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.07))
    ax.set_title(f"End to end, {data['machine'].get('device', '?')}, bf16")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if (args.results / "ffn-h200.json").exists():
        plot_ffn(args.results / "ffn-h200.json", args.results / "ffn-h200.png")
    if (args.results / "e2e-h200.json").exists():
        plot_e2e(args.results / "e2e-h200.json", args.results / "e2e-h200.png")


if __name__ == "__main__":
    main()
