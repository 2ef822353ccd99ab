"""SmolLM2 quality table (issue 2 report): FFSplit against every baseline at equal FFN bytes.

Profiles once on the Wikipedia calibration split, then for each FFN reduction compresses the model
with FFSplit (low-rank, quantization) and the baselines (uniform, random split, score pruning) and
scores perplexity on the disjoint Wikipedia evaluation split. Prints JSON rows; CPU is fine.

    python bench/quality_table.py --calib-tokens 16384 --eval-tokens 16384 --out bench/results/quality-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ffsplit.compress.lowrank import reuse_decompositions
from ffsplit.compress.recipe import compress_model
from ffsplit.config import ProfileConfig, Recipe
from ffsplit.data.windows import calibration_windows, evaluation_windows
from ffsplit.eval import perplexity
from ffsplit.files import write_text_atomic
from ffsplit.models.loading import load_model
from ffsplit.profiling import load_stats, profile_model, save_stats


def recipe_families(heavy_ratios: list[float]) -> list[dict]:
    """Recipes without a budget; each family is swept over the budgets in turn, so the light
    matrices' decompositions (the same at every rank) are computed once per family."""
    out: list[dict] = []
    for method in ("lowrank", "quant"):
        out += [{"method": method, "heavy_ratio": rho} for rho in heavy_ratios]
        # the random split at the largest heavy ratio, where the choice of neurons matters most
        out.append({"method": method, "heavy_ratio": max(heavy_ratios), "selection": "random"})
        out.append({"method": method, "selection": "none"})
    out.append({"method": "prune"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--budgets", default="0.2,0.3,0.431,0.5")
    parser.add_argument("--heavy-ratios", default="0.05,0.1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--stats", type=Path, help="statistics file: reused if present, else written"
    )
    parser.add_argument("--methods", default="lowrank,quant,prune", help="method families to run")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, ref = load_model(args.model)
    calib, calib_ref = calibration_windows(tokenizer, tokens=args.calib_tokens, window=args.window)
    evaluation, eval_ref = evaluation_windows(
        tokenizer, tokens=args.eval_tokens, window=args.window
    )
    started = time.perf_counter()
    if args.stats is not None and args.stats.is_file():
        stats = load_stats(args.stats)
    else:
        stats = profile_model(
            model, calib, ProfileConfig(tokens=args.calib_tokens, window=args.window)
        )
        if args.stats is not None:
            save_stats(stats, args.stats)
    profile_s = time.perf_counter() - started
    dense = perplexity(model, evaluation).perplexity
    rows = []
    result = {
        "command": " ".join(["python"] + sys.argv),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU",
        "model": ref.to_dict(),
        "calibration": calib_ref.to_dict(),
        "evaluation": eval_ref.to_dict(),
        "profile_seconds": profile_s,
        "dense_perplexity": dense,
        "rows": rows,
    }
    print(json.dumps({"dense_perplexity": dense}), flush=True)
    heavy_ratios = [float(x) for x in args.heavy_ratios.split(",")]
    if args.resume and args.out.is_file():
        rows.extend(json.loads(args.out.read_text())["rows"])
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = set(args.methods.split(","))
    for family in [f for f in recipe_families(heavy_ratios) if f["method"] in methods]:
        for budget in budgets:
            recipe = Recipe(ffn_reduction=budget, **family)
            if any(r["label"] == recipe.label for r in rows):
                continue
            net, _, _ = load_model(args.model)
            t0 = time.perf_counter()
            with reuse_decompositions(max_entries=96):
                report, _ = compress_model(net, stats, recipe)
            seconds = time.perf_counter() - t0
            ppl = perplexity(net, evaluation).perplexity
            row = {
                "label": recipe.label,
                "method": recipe.method,
                "baseline": recipe.baseline or "ffsplit",
                "heavy_ratio": recipe.heavy_ratio,
                "target_reduction": budget,
                "ffn_reduction": report.ffn_reduction,
                "ffn_bytes": report.ffn_bytes,
                "perplexity": ppl,
                "perplexity_change_pct": 100 * (ppl / dense - 1),
                "compress_seconds": seconds,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_text_atomic(args.out, json.dumps(result, indent=1))
    write_text_atomic(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
