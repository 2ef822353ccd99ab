"""Aggregate stage: merge the units' statistics (a fixed left fold in unit order) and rank neurons.

The fold order is fixed by the unit numbers, never by which worker finished first, so the merged
statistics (and every heavy set chosen from them) are bitwise the same for any number of workers.
The output folder holds the merged statistics, each layer's scores and neuron order (heavy set for
ratio rho = the first ceil(rho m) of the order), and a JSON summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.records import BaseModel, MergedStats
from tasks.runtime import base_model, set_task_threads, task_resources
from tasks.stage import stage

STATS_FILE = "stats.safetensors"
SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "summary.json"


def merge_unit_stats(unit_paths: list[str]) -> Any:
    """ModelStats of all units: ((u0 + u1) + u2) + ..., loading one unit at a time.

    The Grams stay packed (sums of packed triangles are the packed sums): nothing is unpacked
    only to be packed again when the merge is saved.
    """
    from ffsplit.profiling import load_stats

    if not unit_paths:
        raise FFSplitError("aggregate: no unit statistics to merge")
    merged = load_stats(unit_paths[0], packed=True)
    for path in unit_paths[1:]:
        merged = merged.merged(load_stats(path, packed=True))
    return merged


def finished_aggregate(out: str, **_: Any) -> MergedStats | None:
    """The record of an aggregate folder already written, else None."""
    summary = cache.read_json(Path(out) / SUMMARY_FILE)
    return None if summary is None else _record(summary, out, cached=True, seconds=0.0)


def _record(summary: dict[str, Any], out: str, cached: bool, seconds: float) -> MergedStats:
    return MergedStats(
        path=out,
        cached=cached,
        seconds=seconds,
        tokens=summary["tokens"],
        units=summary["units"],
        calibration=summary.get("calibration") or {},
        summary={k: summary.get(k) for k in ("layers", "profile")},
    )


@stage(
    "aggregate", done=finished_aggregate, resources=lambda **_: task_resources(cpus=1, gpu=False)
)
def aggregate(*, model: BaseModel, unit_paths: list[str], out: str) -> MergedStats:
    """Merged statistics, per-layer scores and order, summary (one atomic folder)."""
    from safetensors.torch import save_file

    from ffsplit.adapters import get_adapter
    from ffsplit.files import atomic_dir
    from ffsplit.profiling import save_stats
    from ffsplit.profiling.stats import summary
    from ffsplit.selection import neuron_scores, order_by_score

    model_sha256 = model.sha256
    target = Path(out)
    started = time.perf_counter()
    set_task_threads()
    merged = merge_unit_stats(unit_paths)
    found = merged.meta.get("model_sha256")
    if found != model_sha256:
        raise FFSplitError(
            f"aggregate: unit statistics were collected on model sha256 {str(found)[:12]}..., "
            f"expected {model_sha256[:12]}...; clear the stale cache entries"
        )
    calibration = dict(merged.meta.get("calibration") or {})
    calibration.pop("shard", None)
    calibration.pop("unit", None)
    calibration["units"] = len(unit_paths)
    merged.meta["calibration"] = calibration
    merged.meta.pop("unit", None)
    net, _, _ = base_model(model.name, model_sha256)
    adapter = get_adapter(net)
    tensors = {}
    layers: dict[str, Any] = {}
    for handle in adapter.ffns(net):
        stats = merged.layers.get(handle.layer)
        if stats is None:
            raise FFSplitError(f"aggregate: statistics lack layer {handle.layer}")
        down = adapter.weights(net, handle).down
        scores = neuron_scores(stats, down)
        tensors[f"layer.{handle.layer}.score"] = scores.contiguous()
        tensors[f"layer.{handle.layer}.order"] = order_by_score(scores).contiguous()
        norms = down.detach().double().norm(dim=0)
        layers[str(handle.layer)] = {"neurons": stats.neurons, **summary(stats, norms)}
    record = {
        "model_sha256": model_sha256,
        "tokens": merged.tokens,
        "units": len(unit_paths),
        "calibration": calibration,
        "layers": layers,
        "profile": merged.meta.get("profile"),
    }
    try:
        with atomic_dir(target) as tmp:
            save_stats(merged, tmp / STATS_FILE)
            save_file(tensors, str(tmp / SCORES_FILE))
            (tmp / SUMMARY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    except FileExistsError:  # a concurrent run finished the same content-keyed entry first
        done = finished_aggregate(out)
        if done is None:
            raise
        return done
    return _record(record, out, cached=False, seconds=time.perf_counter() - started)


def stats_file(aggregate_dir: str | Path) -> Path:
    """The merged statistics file inside an aggregate folder."""
    return Path(aggregate_dir) / STATS_FILE


def heavy_sets(aggregate_dir: str | Path, ratio: float) -> dict[int, list[int]]:
    """Heavy neuron indices per layer (sorted) for heavy ratio `ratio`, from the stored order."""
    from safetensors.torch import load_file

    from ffsplit.selection import heavy_count

    orders = load_file(str(Path(aggregate_dir) / SCORES_FILE))
    out: dict[int, list[int]] = {}
    for name, order in orders.items():
        if name.endswith(".order"):
            layer = int(name.split(".")[1])
            out[layer] = sorted(order[: heavy_count(order.numel(), ratio)].tolist())
    return dict(sorted(out.items()))


def aggregate_path(cache_dir: str, unit_paths: list[str]) -> str:
    """Where the merged statistics of these units live in the cache."""
    keys = [Path(p).name.removesuffix(".safetensors") for p in unit_paths]
    return str(cache.merged_stats_dir(Path(cache_dir), cache.merged_stats_key(keys)))
