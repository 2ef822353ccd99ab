"""Pipeline overhead: the compress flow (Prefect tasks on Ray, cold cache) against the library's jobs
for the same job, in one run; prints JSON and writes bench/results/pipeline_overhead[-TAG].json.

Same job both ways (pinned below): profile SmolLM2 on calibration text, compress it by one recipe,
evaluate the variant (perplexity, size, latency raced against dense) and the dense model's
perplexity. Library: ffsplit.jobs.compress_job (profiles in-process) + two evaluate_jobs. Pipeline:
flows.compress.compress with a fresh cache, no registration (registration is extra work the library
has no counterpart for; --register times it separately), then once more on the warm cache: every
stage is then a cache hit and the time left is the orchestration's fixed cost (Ray start, Prefect
flow and task runs, validation). The flow talks to PREFECT_API_URL when set, else to a temporary
Prefect server started before any timing (a deployed pipeline's server is long-running). Ray embedded unless RAY_ADDRESS.

    python bench/pipeline_overhead.py [--calib-tokens 4096] [--eval-tokens 4096] [--cpus N] [--tag cpu]

--cpus N gives both the same CPUs: the library N torch threads, the pipeline an embedded Ray of N
CPUs (its tasks run one thread per CPU they ask for). With --cpus 1 nothing runs in parallel on
either side, so the difference is the orchestration alone (Prefect, Ray, files, model reloads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
RECIPE = {"method": "lowrank", "heavy_ratio": 0.1, "ffn_reduction": 0.3}


def library(workdir: Path, calib_tokens: int, eval_tokens: int) -> dict[str, Any]:
    """The job through ffsplit.jobs directly, stage by stage."""
    from ffsplit.config import ProfileConfig, Recipe
    from ffsplit.jobs import compress_job, evaluate_job

    recipe = Recipe.from_dict({**RECIPE, "profile": ProfileConfig(tokens=calib_tokens).to_dict()})
    started = time.perf_counter()
    compressed = compress_job(MODEL, recipe, workdir / "variant")
    t1 = time.perf_counter()
    variant = evaluate_job(workdir / "variant", max_tokens=eval_tokens, latency=True)
    t2 = time.perf_counter()
    dense = evaluate_job(MODEL, max_tokens=eval_tokens)
    t3 = time.perf_counter()
    return {
        "seconds": t3 - started,
        "stages": {
            "profile": compressed["profile_seconds"],
            "compress_and_save": t1 - started - compressed["profile_seconds"],
            "evaluate_variant": t2 - t1,
            "evaluate_dense": t3 - t2,
        },
        "perplexity": variant["perplexity"],
        "dense_perplexity": dense["perplexity"],
        "ffn_reduction": compressed["ffn_reduction"],
    }


def pipeline(workdir: Path, calib_tokens: int, **flow: Any) -> dict[str, Any]:
    """The same job through the compress flow with an empty cache (flow: the flow's settings)."""
    from flows.compress import compress

    recipe = {**RECIPE, "profile": {"tokens": calib_tokens}}
    started = time.perf_counter()
    summary = compress(
        model=MODEL,
        recipe=recipe,
        cache_dir=str(workdir / "cache"),
        run_dir=str(workdir / "run"),
        **flow,
    )
    return {
        "seconds": time.perf_counter() - started,
        "stages": summary["stage_seconds"],
        "flow_seconds": summary["seconds"],
        "perplexity": summary["metrics"]["perplexity"],
        "dense_perplexity": summary["dense"]["perplexity"],
        # inside the Ray tasks (their own clocks): the stage walls minus these are orchestration,
        # cold workers and waiting
        "in_task_seconds": {
            "profile_units_sum": summary["metrics"].get("profile_seconds"),
            "compress_shards_sum": summary["metrics"].get("compress_seconds"),
            "evaluate_variant": summary["metrics"].get("eval_seconds"),
            "evaluate_dense": summary["dense"].get("eval_seconds"),
        },
        "ffn_reduction": summary["metrics"]["ffn_reduction"],
        "cluster": summary["cluster"],
        "prefect_api": os.environ.get("PREFECT_API_URL") or "temporary server, started untimed",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--profile-units", type=int, default=2)
    parser.add_argument("--compress-shards", type=int, default=4)
    parser.add_argument("--register", action="store_true", help="also register (needs MLflow)")
    parser.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for each side (default: all)"
    )
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="ffsplit-overhead-"))
    torch.set_num_threads(args.cpus)
    services = contextlib.ExitStack()
    if not os.environ.get("PREFECT_API_URL"):
        # A deployed pipeline talks to a long-running server: start one before timing anything.
        from prefect.testing.utilities import prefect_test_harness

        services.enter_context(prefect_test_harness(server_startup_timeout=180))
    try:
        lib = library(workdir / "library", args.calib_tokens, args.eval_tokens)
        flow = dict(  # the compress flow's settings, the same for both runs
            eval_tokens=args.eval_tokens,
            profile_units=args.profile_units,
            compress_shards=args.compress_shards,
            register_model=args.register,
            ray_cpus=args.cpus,
        )
        pipe = pipeline(workdir / "pipeline", args.calib_tokens, **flow)
        # Again on the warm cache: every stage is a hit, what is left is the orchestration itself.
        warm = pipeline(workdir / "pipeline", args.calib_tokens, **flow)
    finally:
        services.close()
        shutil.rmtree(workdir, ignore_errors=True)
    pipe_work = pipe["seconds"] - pipe["stages"].get("register", 0.0)
    result = {
        "workload": {
            "model": MODEL,
            "recipe": RECIPE,
            "calib_tokens": args.calib_tokens,
            "eval_tokens": args.eval_tokens,
            "profile_units": args.profile_units,
            "compress_shards": args.compress_shards,
            "latency": True,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_average": os.getloadavg(),
        },
        "library": lib,
        "pipeline": pipe,
        "overhead_pct": 100.0 * (pipe_work / lib["seconds"] - 1.0),
        "pipeline_warm_cache": warm,
        "fixed_orchestration_pct": 100.0 * warm["seconds"] / lib["seconds"],
        "registration_seconds": pipe["stages"].get("register"),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pipeline_overhead-{args.tag}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
