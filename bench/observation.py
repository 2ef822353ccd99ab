"""The paper's premise for one model (issue 6): heavy-hitter concentration, hit frequency,
heavy-set stability across corpora (Wikipedia vs news), and the top-vs-random neuron ablation.

A thin CLI over ffsplit.jobs.observation_job (the flow `python -m flows.observation` runs the same
job on Ray and logs it in MLflow). Writes OUT/observation.json and the plots OUT/observation.png,
OUT/ablation.png (and OUT/ablation_hidden.png for encoders), each atomically. CPU is fine.

    python bench/observation.py --model smollm2-135m --calib-tokens 8192 --eval-tokens 8192 \
        --out bench/results/observation/smollm2-135m

Log a record folder in MLflow afterwards with
`python -m flows.observation log --record bench/results/observation/smollm2-135m`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffsplit.errors import FFSplitError  # noqa: E402
from ffsplit.files import write_text_atomic  # noqa: E402
from ffsplit.jobs import OBSERVATION_DEFAULTS, OBSERVATION_HELP, observation_job  # noqa: E402
from reports.observation_plots import observation_plots  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(stage: str, done: int, total: int) -> None:
    """A line per quarter of each stage (and every ablation evaluation)."""
    if done == total or stage.startswith("ablation") or done % max(1, total // 4) < 4:
        log(f"{stage}: {done}/{total}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="smollm2-135m | gemma3-270m | minilm-l6")
    for name, default in OBSERVATION_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=default, help=OBSERVATION_HELP.get(name))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "bench/observation.py", *given])
    try:
        record = observation_job(
            args.model,
            **{name: getattr(args, name) for name in OBSERVATION_DEFAULTS},
            command=command,
            progress=progress,
        )
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_text_atomic(args.out / "observation.json", json.dumps(record, indent=1) + "\n")
    pngs = observation_plots(record, args.out)
    log(f"wrote {path}, {', '.join(str(p) for p in pngs)}")
    print(json.dumps(headline(record), indent=1))
    return 0


def headline(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers a report quotes: means over layers, and the ablation."""
    mean = record["observation"]["mean"]
    out = {
        "model": record["model"].get("name"),
        "top1_share": mean["top1_share"],
        "top5_share": mean["top5_share"],
        "top10_share": mean["top10_share"],
        "score_gini": mean["score_gini"],
        "heavy_slot_share": mean["heavy_slot_share"],
        "uniform_slot_share": mean["uniform_slot_share"],
        "hit_lift": mean["hit_lift"],
        "coverage_other_corpus": record["coverage"]["mean"]["covered_rate"],
        "coverage_random": record["coverage"]["mean"]["random_covered_rate"],
        "jaccard": {k: v["mean"]["jaccard"] for k, v in record["stability"].items()},
        "random_jaccard": {k: v["mean"]["random_jaccard"] for k, v in record["stability"].items()},
    }
    keys = ("metric", "dense", "top", "bottom", "random_mean", "random")
    for name in ("ablation", "ablation_hidden"):
        if name in record:
            out[name] = {k: record[name][k] for k in keys if k in record[name]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
