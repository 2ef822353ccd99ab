"""Evaluate stage: quality (perplexity on the evaluation split, fixed token budget), size, and CPU/GPU
latency raced against the dense base in one run (ffsplit.jobs.evaluate_job).

An evaluation asks for all the CPUs of a node (a GPU when the cluster has them) so that its latency
is not measured beside other work. Records are JSON, written atomically and keyed by the variant
and the evaluation settings, so a resumed run does not evaluate a finished variant again.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.runtime import (
    node_cpus,
    prefect_task,
    release_worker_caches,
    run_remote,
    set_task_threads,
    task_device,
    task_resources,
)

# The default latency workload: that of ffsplit.jobs.latency_against_base (recorded with results).
LATENCY_WORKLOAD = {"prompt_tokens": 128, "decode_tokens": 32, "repeats": 5}


def eval_params(
    max_tokens: int = 16384,
    window: int = 512,
    corpus: str = "wikipedia",
    latency: bool = True,
    prompt_tokens: int = LATENCY_WORKLOAD["prompt_tokens"],
    decode_tokens: int = LATENCY_WORKLOAD["decode_tokens"],
    repeats: int = LATENCY_WORKLOAD["repeats"],
) -> dict[str, Any]:
    """The settings an evaluation depends on (part of its cache key), validated.

    prompt_tokens / decode_tokens / repeats: the latency race's workload (prefill of a prompt, then
    greedy decode steps, dense and variant interleaved, median of `repeats` rounds).
    """
    checks = (
        ("eval_tokens", max_tokens, 2),
        ("eval_window", window, 2),
        ("latency_prompt_tokens", prompt_tokens, 1),
        ("latency_decode_tokens", decode_tokens, 0),
        ("latency_repeats", repeats, 1),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FFSplitError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_tokens < window:
        raise FFSplitError(f"eval_tokens ({max_tokens}) must be at least one window ({window})")
    workload = {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats}
    return {
        "max_tokens": max_tokens,
        "window": window,
        "corpus": corpus,
        "latency": bool(latency),
        "split": "evaluation",
        **(workload if latency else {}),
    }


def evaluate_job(subject: str, params: dict[str, Any], out: str) -> dict[str, Any]:
    """Ray task body: evaluate a variant folder (or a base model) and write the JSON record.

    Quality, size and the latency race (with the workload of `params`) by ffsplit.jobs.evaluate_job,
    on one load of the subject.
    """
    from ffsplit.files import write_text_atomic
    from ffsplit.jobs import evaluate_job as library_evaluate

    target = Path(out)
    cached = cache.read_json(target)
    if cached is not None:
        return {**cached, "cached": True, "record_path": out}
    started = time.perf_counter()
    release_worker_caches()  # this worker may hold a base model and statistics from other stages
    threads = set_task_threads()
    device = task_device()
    # one load of the subject for quality and the latency race (as the library's own job does)
    workload = {k: params[k] for k in LATENCY_WORKLOAD if k in params}
    result = library_evaluate(
        subject,
        corpus=params["corpus"],
        max_tokens=params["max_tokens"],
        window=params["window"],
        latency=bool(params["latency"]),
        latency_workload=workload,
        device=device,
    )
    result["seconds"] = time.perf_counter() - started
    result["threads"] = threads
    result["params"] = params
    write_text_atomic(target, json.dumps(result, indent=1, sort_keys=True))
    return {**result, "cached": False, "record_path": out}


def run_evaluate(subject: str, params: dict[str, Any], out: str) -> dict[str, Any]:
    """Evaluate on Ray with a whole node's CPUs; a finished record returns at once."""
    cached = cache.read_json(Path(out))
    if cached is not None:
        return {**cached, "cached": True, "record_path": out}
    return run_remote(
        evaluate_job, subject, params, out, resources=task_resources(cpus=node_cpus())
    )


@prefect_task(name="evaluate")
def evaluate(subject: str, params: dict[str, Any], out: str) -> dict[str, Any]:
    """Prefect task: quality, size and speed of a variant or base model (cached by content)."""
    return run_evaluate(subject, params, out)


def metrics(record: dict[str, Any], dense: dict[str, Any] | None = None) -> dict[str, float]:
    """MLflow metrics of an evaluation record, named as tracking.registry documents them.

    dense: the dense model's record, for perplexity_change_pct / accuracy_change_pct.
    """
    from tracking import registry

    out: dict[str, float] = {registry.FFN_REDUCTION: float(record.get("ffn_reduction", 0.0))}
    size = record.get("size") or {}
    out[registry.PARAMETERS] = float(size.get("total_params", 0))
    out[registry.BYTES] = float(size.get("total_bytes", 0))
    out["ffn_bytes"] = float(size.get("ffn_bytes", 0))
    out["ffn_params"] = float(size.get("ffn_params", 0))
    for metric, change in (
        (registry.PERPLEXITY, registry.PERPLEXITY_CHANGE),
        (registry.ACCURACY, registry.ACCURACY_CHANGE),
    ):
        if metric in record:
            out[metric] = float(record[metric])
            if dense is not None and metric in dense:
                out[change] = 100.0 * (float(record[metric]) / float(dense[metric]) - 1.0)
    tested = (record.get("eval") or {}).get("test")
    if registry.ACCURACY in record and isinstance(tested, int) and tested > 0:
        # The probe's test set is finite: its binomial standard error says which accuracy
        # differences are noise (the results page uses it).
        p = float(record[registry.ACCURACY])
        out["accuracy_test_examples"] = float(tested)
        out["accuracy_stderr"] = math.sqrt(max(p * (1.0 - p), 0.0) / tested)
    latency = record.get("latency") or {}
    speedup = latency.get("speedup")
    if speedup is not None:
        out[registry.PREFILL_SPEEDUP] = float(speedup["prefill"])
        if "decode" in speedup:
            out[registry.DECODE_SPEEDUP] = float(speedup["decode"])
        variant = latency.get("variant") or {}
        out["prefill_ms"] = float(variant.get("prefill_ms_median", math.nan))
        if variant.get("decode_ms_per_token_median") is not None:
            out["decode_ms_per_token"] = float(variant["decode_ms_per_token_median"])
    if "seconds" in record:
        out["eval_seconds"] = float(record["seconds"])
    return {k: v for k, v in out.items() if math.isfinite(v)}
