"""Evaluate stage: quality (perplexity on the evaluation split, fixed token budget), size, and CPU/GPU
latency raced against the dense base in one run (ffsplit.jobs.evaluate_job), and the MLflow
metrics an evaluation record gives.

Records are JSON, written atomically and keyed by the variant and the evaluation settings
(EvalConfig), so a resumed run does not evaluate a finished variant again.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ffsplit.config import EvalConfig
from tasks import cache
from tasks.records import Evaluation
from tasks.runtime import (
    node_cpus,
    release_worker_caches,
    set_task_threads,
    task_device,
    task_resources,
)
from tasks.stage import stage


def evaluation_path(cache_dir: str, subject_key: str, config: EvalConfig) -> str:
    """Where the evaluation of a variant key (or a base model's sha256) lives in the cache."""
    return str(cache.eval_path(Path(cache_dir), cache.eval_key(subject_key, config.key_dict())))


def finished_evaluation(out: str, **_: Any) -> Evaluation | None:
    """The record of an evaluation already written, else None."""
    record = cache.read_json(Path(out))
    return None if record is None else Evaluation(path=out, cached=True, record=record)


@stage("evaluate", done=finished_evaluation, resources=lambda **_: task_resources(cpus=node_cpus()))
def evaluate(*, subject: str, config: dict[str, Any], out: str) -> Evaluation:
    """Quality, size and the latency race (ffsplit.jobs.evaluate_job, on one load of the
    subject: a variant folder or a base model) written as one JSON record.

    Asks for all the CPUs of a node (a GPU when the cluster has them), so that its latency is not
    measured beside other work.
    """
    from ffsplit.files import write_text_atomic
    from ffsplit.jobs import evaluate_job

    settings = EvalConfig.from_dict(config, where="evaluation settings")
    started = time.perf_counter()
    release_worker_caches()  # this worker may hold a base model and statistics from other stages
    threads = set_task_threads()
    device = task_device()
    result = evaluate_job(
        subject,
        corpus=settings.corpus,
        max_tokens=settings.tokens,
        window=settings.window,
        latency=settings.latency,
        latency_workload=settings.workload,
        device=device,
    )
    result["seconds"] = time.perf_counter() - started
    result["threads"] = threads
    result["device"] = device
    result["params"] = settings.key_dict()
    write_text_atomic(out, json.dumps(result, indent=1, sort_keys=True))
    return Evaluation(path=out, cached=False, record=result)


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
    if "hidden_error" in record:  # encoder variants: last hidden states against the dense base
        out["hidden_error"] = float(record["hidden_error"])
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
        for metric, key in (
            (registry.PREFILL_SPEEDUP, "prefill"),
            (registry.DECODE_SPEEDUP, "decode"),
        ):
            if key not in speedup:
                continue
            out[metric] = float(speedup[key])
            interval = (latency.get("speedup_interval") or {}).get(key)  # older records: none
            if interval:
                out[f"{metric}_low"] = float(interval["low"])
                out[f"{metric}_high"] = float(interval["high"])
        variant = latency.get("variant") or {}
        out["prefill_ms"] = float(variant.get("prefill_ms_median", math.nan))
        if variant.get("decode_ms_per_token_median") is not None:
            out["decode_ms_per_token"] = float(variant["decode_ms_per_token_median"])
    for name, value in ((record.get("gpu_speed") or {}).get("metrics") or {}).items():
        out[name] = float(value)  # gpu_decode_speedup_b1 / _b16, gpu_prefill_speedup (+ _low/_high)
    if "seconds" in record:
        out["eval_seconds"] = float(record["seconds"])
    return {k: v for k, v in out.items() if math.isfinite(v)}
