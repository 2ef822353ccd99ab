"""Healing on SmolLM2 (issue 6): perplexity with and without a short distillation, and its cost.

Compresses the model once per FFN reduction (FFSplit low-rank, activation-aware, statistics from
--stats) through the library job (ffsplit.jobs.compress_job), then heals that variant with each
--heal config through ffsplit.jobs.heal_job (the pipeline's heal step runs the same job) and
scores perplexity of both on the Wikipedia evaluation split, disjoint from the calibration text
that profiling and healing see. Rows are written after each heal (--resume keeps them).

    python bench/heal.py --stats /work/quality_stats.safetensors --budgets 0.431 \\
        --heal '{"steps": 100, "loss": "local"}' --out bench/results/heal-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ffsplit.compress.lowrank import reuse_decompositions
from ffsplit.config import (
    DEFAULT_HEAVY_RATIO,
    DEFAULT_WINDOW,
    PIPELINE_CALIB_TOKENS,
    HealConfig,
    ProfileConfig,
    Recipe,
)
from ffsplit.data.windows import evaluation_windows
from ffsplit.eval import perplexity
from ffsplit.files import write_text_atomic
from ffsplit.jobs import compress_job, heal_job
from ffsplit.models.loading import load_model
from ffsplit.variant import load_variant, read_manifest


def _progress(started: float) -> Any:
    """Print the heal's progress to stderr every tenth of its steps."""

    def show(stage: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            elapsed = time.perf_counter() - started
            print(f"{stage} {done}/{total} {elapsed:.0f}s", file=sys.stderr, flush=True)

    return show


def _perplexity(folder: Path, windows: torch.Tensor) -> float:
    model, _, _ = load_variant(folder)
    return perplexity(model, windows).perplexity


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--stats", type=Path, required=True, help="statistics of --calib-tokens")
    parser.add_argument("--calib-tokens", type=int, default=PIPELINE_CALIB_TOKENS)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--budgets", default="0.431")
    parser.add_argument("--heavy-ratio", type=float, default=DEFAULT_HEAVY_RATIO)
    parser.add_argument(
        "--heal", action="append", type=json.loads, default=[], help="HealConfig JSON (repeat)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/ffsplit-heal-bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    parser.add_argument("--keep-healed", action="store_true", help="keep healed variant folders")
    return parser.parse_args()


def _compressed(args: argparse.Namespace, budget: float, result: dict, evaluation: Any) -> tuple:
    """The unhealed variant at a budget (kept between runs: compressing takes minutes) and its
    entry in the result (reduction, compression seconds, perplexity)."""
    recipe = Recipe(
        method="lowrank",
        heavy_ratio=args.heavy_ratio,
        ffn_reduction=budget,
        profile=ProfileConfig(tokens=args.calib_tokens, window=args.window),
    )
    folder = args.work / recipe.label
    if not folder.is_dir():
        with reuse_decompositions(max_entries=96):
            compress_job(args.model, recipe, folder, stats_path=args.stats)
    manifest = read_manifest(folder)
    entry = result["variants"].setdefault(recipe.label, {})
    entry["ffn_reduction"] = manifest["sizes"]["ffn_reduction"]
    entry["compress_seconds"] = manifest["compression_seconds"]
    if "perplexity" not in entry:
        entry["perplexity"] = _perplexity(folder, evaluation)
        entry["perplexity_change_pct"] = 100 * (
            entry["perplexity"] / result["dense_perplexity"] - 1
        )
    print(json.dumps({recipe.label: entry}), flush=True)
    return recipe, folder, entry


def _healed_row(
    args: argparse.Namespace,
    config: HealConfig,
    label: str,
    folder: Path,
    entry: dict,
    result: dict,
    dense: tuple,
    evaluation: Any,
) -> dict[str, Any]:
    """Heal the variant with one config, measure it, and the row that records it."""
    healed = args.work / f"{label}-healed"
    shutil.rmtree(healed, ignore_errors=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    job = heal_job(folder, config, healed, dense=dense, progress=_progress(time.perf_counter()))
    wall = time.perf_counter() - started
    report = json.loads((healed / "manifest.json").read_text())["heal"]
    ppl = _perplexity(healed, evaluation)
    if not args.keep_healed:
        shutil.rmtree(healed, ignore_errors=True)
    return {
        "command": result["command"],  # rows of several runs share the file (--resume)
        "variant": label,
        "label": job["label"],
        "ffn_reduction": job["ffn_reduction"],
        "heal": config.to_dict(),
        "perplexity_before": entry["perplexity"],
        "perplexity_after": ppl,
        "perplexity_change_pct_after": 100 * (ppl / result["dense_perplexity"] - 1),
        "heal_seconds": report["seconds"],
        "heal_cpu_seconds": report["cpu_seconds"],
        "heal_job_seconds": wall,
        "load_average_1m": [load_before, os.getloadavg()[0]],  # before, after
        "loss_before": report["before"],
        "loss_after": report["after"],
        **{k: report[k] for k in ("parameters", "threads", "curve", "layers", "calibration")},
    }


def main() -> None:
    args = _arguments()
    heals = [HealConfig.from_dict({"steps": 1, **h}) for h in args.heal]
    budgets = [float(b) for b in args.budgets.split(",")]
    dense_model, tokenizer, ref = load_model(args.model)
    evaluation, eval_ref = evaluation_windows(
        tokenizer, tokens=args.eval_tokens, window=args.window
    )
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores shared with "
        f"other jobs, {torch.get_num_threads()} torch threads, CPU, nice 5",
        "model": ref.to_dict(),
        "evaluation": eval_ref.to_dict(),
        "dense_perplexity": previous.get("dense_perplexity")
        or perplexity(dense_model, evaluation).perplexity,
        "variants": previous.get("variants", {}),
        "rows": previous.get("rows", []),
    }
    print(json.dumps({"dense_perplexity": result["dense_perplexity"]}), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for budget in budgets:
        recipe, folder, entry = _compressed(args, budget, result, evaluation)
        write_text_atomic(args.out, json.dumps(result, indent=1))
        for config in heals:
            if any(
                r["variant"] == recipe.label and r["heal"] == config.to_dict()
                for r in result["rows"]
            ):
                continue
            dense = (dense_model, ref.weights_sha256)
            row = _healed_row(args, config, recipe.label, folder, entry, result, dense, evaluation)
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "layers")}))
            write_text_atomic(args.out, json.dumps(result, indent=1))
    write_text_atomic(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
