"""Plots of the observation (issue 6) from its JSON record (ffsplit.jobs.observation_job's, as
bench/observation.py and the observation flow write it to observation.json).

Figures per model: the per-layer observation (output-norm shares of the top neurons, hit
frequency of the heavy set, Jaccard stability of the heavy set across corpora, each against what a
uniform / random choice gives) and the ablation (top neurons zeroed against random and bottom ones),
once per ablation metric (perplexity or probe accuracy; for encoders also the hidden-state error).
matplotlib with the Agg backend; every PNG is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from reports.figures import pyplot, save_figure

SHARE_COLORS = {1: "tab:red", 5: "tab:orange", 10: "tab:blue"}


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def _require(result: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in result]
    if missing:
        raise FFSplitError(
            f"observation record lacks {', '.join(missing)}: produce it with "
            "python -m flows.observation run (or bench/observation.py)"
        )


def _model_name(result: Mapping[str, Any]) -> str:
    model = result.get("model") or {}
    return str(model.get("name") or model.get("path") or "model")


def _pair(
    ax: Any,
    layers: list[float],
    measured: list[float],
    expected: list[float] | None,
    color: str,
    label: str,
    marker: str = "o-",
    expected_label: str | None = None,
) -> None:
    """A measured series (solid, markers) and what chance gives (dashed, same colour)."""
    ax.plot(layers, measured, marker, color=color, ms=3.5, lw=1.4, label=label)
    if expected is not None:
        ax.plot(layers, expected, "--", color=color, lw=1, alpha=0.7, label=expected_label)


def _shares_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    layers = _column(rows, "layer")
    for p, color in SHARE_COLORS.items():
        share = [100 * v for v in _column(rows, f"top{p}_share")]
        _pair(ax, layers, share, None, color, f"top {p}% of neurons")
        ax.axhline(p, color=color, ls="--", lw=1, alpha=0.7)
    ax.plot([], [], "k--", lw=1, alpha=0.7, label="uniform spread")
    ax.set_ylim(0, 100)
    ax.set_ylabel("share of sum of squared neuron output norms")
    ax.set_title("output norm held by the top neurons")


def _hits_panel(ax: Any, result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    ratio = 100 * float(result["observation"]["heavy_ratio"])
    corpus_a = (result.get("corpora") or {}).get("a", "corpus A")
    pct = lambda values: [100 * v for v in values]  # noqa: E731
    _pair(
        ax,
        _column(rows, "layer"),
        pct(_column(rows, "heavy_slot_share")),
        pct(_column(rows, "uniform_slot_share")),
        "tab:red",
        f"{corpus_a}: top-k slots taken by heavy set",
        expected_label="same, random neurons",
    )
    coverage = result.get("coverage")
    if coverage:
        cov_rows = coverage["layers"]
        _pair(
            ax,
            _column(cov_rows, "layer"),
            pct(_column(cov_rows, "covered_rate")),
            pct(_column(cov_rows, "random_covered_rate")),
            "tab:purple",
            f"{coverage.get('corpus', 'other corpus')}: tokens with heavy in top-k",
            marker="s-",
            expected_label="same, random neurons",
        )
    ax.set_ylim(0, 100)
    ax.set_ylabel("percent")
    k = rows[0].get("hit_top_k")
    ax.set_title(f"hit frequency of the heavy {ratio:g}% ({corpus_a} scores; k={k} in layer 0)")


def _stability_panel(ax: Any, result: Mapping[str, Any]) -> None:
    stability = result["stability"]
    for key in sorted(stability, key=lambda s: float(stability[s]["ratio"])):
        block = stability[key]
        p = round(100 * float(block["ratio"]))
        srows = block["layers"]
        _pair(
            ax,
            _column(srows, "layer"),
            _column(srows, "jaccard"),
            _column(srows, "random_jaccard"),
            SHARE_COLORS.get(p, "tab:gray"),
            f"heavy {p}%",
        )
    ax.plot([], [], "k--", lw=1, alpha=0.7, label="random sets (expected)")
    ax.set_ylim(0, 1.02)
    corpora = result.get("corpora") or {}
    pair = f"{corpora.get('a', 'corpus A')} vs {corpora.get('b', 'corpus B')}"
    ax.set_ylabel("Jaccard of heavy sets")
    ax.set_title(f"heavy-set stability, {pair}")


def observation_figure(
    result: Mapping[str, Any], out_png: str | Path, title: str | None = None
) -> Path:
    """Three panels over layers: top-1/5/10% share of squared output norm; hit frequency of the
    heavy set (in-corpus top-k slot share and, if measured, per-token coverage on the other
    corpus); Jaccard of the heavy sets of two corpora at 1/5/10%. Dashed: uniform / random."""
    _require(result, "observation", "stability")
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    rows = result["observation"]["layers"]
    fig, (shares, hits, stable) = plt.subplots(1, 3, figsize=(16, 4.8))
    _shares_panel(shares, rows)
    _hits_panel(hits, result, rows)
    _stability_panel(stable, result)
    for ax in (shares, hits, stable):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(
            fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False
        )
    for ax in (shares, hits):
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    tokens = result["observation"].get("tokens")
    fig.suptitle(
        title
        or f"{_model_name(result)}: neuron output norms over {tokens:,} calibration "
        "tokens (score s_j = sqrt(S2_j)·||v_j||)",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, out_png)


def _value_text(value: float, higher: bool) -> str:
    if not math.isfinite(value):
        return "inf"
    if higher:
        return f"{value:.3f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def ablation_figure(
    result: Mapping[str, Any],
    out_png: str | Path,
    key: str = "ablation",
    title: str | None = None,
) -> Path:
    """Bars: dense, lowest-score neurons zeroed, random neurons zeroed (mean, seeds as dots), top
    neurons zeroed; the metric on a log axis when it spans over a decade (perplexity).
    result[key] is an ffsplit.analysis.ablation record (metric, higher_is_better, chance optional)."""
    _require(result, key)
    ab = result[key]
    metric = str(ab.get("metric", "quality"))
    higher = bool(ab.get("higher_is_better", False))
    chance = ab.get("chance")
    pct = round(100 * float(ab["fraction"]), 3)
    labels = ["dense"]
    values = [float(ab["dense"])]
    colors = ["0.55"]
    if "bottom" in ab:
        labels.append(f"bottom {pct:g}%\nzeroed")
        values.append(float(ab["bottom"]))
        colors.append("tab:green")
    labels.append(f"random {pct:g}%\nzeroed (mean)")
    values.append(float(ab["random_mean"]))
    colors.append("tab:blue")
    random_index = len(values) - 1
    labels.append(f"top {pct:g}% by score\nzeroed")
    values.append(float(ab["top"]))
    colors.append("tab:red")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    finite = [v for v in values if math.isfinite(v) and v > 0]
    log = not higher and len(finite) == len(values) and max(finite) / min(finite) > 10
    shown = [v if math.isfinite(v) else (max(finite) if finite else 1.0) for v in values]
    bars = ax.bar(range(len(values)), shown, color=colors, width=0.62)
    seeds = [float(v) for v in ab.get("random", [])]
    ax.plot([random_index] * len(seeds), seeds, "k.", ms=7, label="random sets (one per seed)")
    for bar, value in zip(bars, values, strict=True):
        text = _value_text(value, higher)
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    if log:
        ax.set_yscale("log")
    elif higher:
        ax.set_ylim(0, min(1.0, max(shown) * 1.15) if max(shown) <= 1 else max(shown) * 1.15)
    else:
        ax.set_ylim(0, max(shown) * 1.15)
    if chance is not None:
        ax.axhline(float(chance), color="0.3", ls=":", lw=1, label=f"chance ({float(chance):.3f})")
    ax.set_xticks(range(len(values)), labels, fontsize=9)
    better = "higher is better" if higher else "lower is better"
    ax.set_ylabel(textwrap.fill(f"{metric} ({better})", 46), fontsize=9)
    layers = len(ab.get("layers", []))
    ax.set_title(
        title
        or f"{_model_name(result)}: zeroing {pct:g}% of the neurons of each of {layers} FFN layers",
        fontsize=11,
    )
    ax.grid(True, axis="y", alpha=0.3)
    if seeds or chance is not None:
        ax.legend(
            fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
        )
    fig.tight_layout()
    return save_figure(fig, out_png)


def observation_plots(record: Mapping[str, Any] | str | Path, out_dir: str | Path) -> list[Path]:
    """Both figures of one observation record (a dict or the path of observation.json)."""
    if not isinstance(record, Mapping):
        path = Path(record)
        if not path.is_file():
            raise FFSplitError(
                f"observation record {path} does not exist: run python -m flows.observation run "
                "(or bench/observation.py)"
            )
        record = json.loads(path.read_text())
    out = Path(out_dir)
    written = [
        observation_figure(record, out / "observation.png"),
        ablation_figure(record, out / "ablation.png"),
    ]
    if "ablation_hidden" in record:
        written.append(ablation_figure(record, out / "ablation_hidden.png", key="ablation_hidden"))
    return written
