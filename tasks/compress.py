"""Compress stage: one Ray task per shard of layers, each writing a safetensors shard.

`compress_layer` is a pure function of one FFN's weights and statistics, so shards are independent
and a layer's result does not depend on which worker, or how many, computed it (tasks run a fixed
number of threads). Shards are groups of consecutive layers fixed by a run parameter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ffsplit.config import Recipe
from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.runtime import (
    WORKER_CACHES,
    base_model,
    prefect_task,
    run_remote,
    set_task_threads,
    task_device,
    task_resources,
)

_STATS: OrderedDict[str, Any] = OrderedDict()  # merged statistics, one file per worker process
WORKER_CACHES.append(_STATS)


def layer_shards(num_layers: int, shards: int) -> list[list[int]]:
    """Consecutive layer groups, as even as possible: shard i gets layers [a_i, a_{i+1})."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise FFSplitError(f"compress_shards must be a positive integer, got {shards!r}")
    shards = min(shards, num_layers)
    bounds = [round(i * num_layers / shards) for i in range(shards + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(shards)]


def _stats(path: str) -> Any:
    from ffsplit.profiling import load_stats

    if path not in _STATS:
        _STATS.clear()  # free the previous statistics (Gram matrices: ~650 MB for SmolLM2)
        _STATS[path] = load_stats(path)
    return _STATS[path]


def compress_shard_job(
    model: str,
    model_sha256: str,
    stats_path: str | None,
    recipe: dict[str, Any],
    layers: list[int],
    out: str,
) -> dict[str, Any]:
    """Ray task body: compress `layers` of the base model by the recipe and write one shard."""
    from ffsplit.adapters import get_adapter
    from ffsplit.compress.recipe import compress_layer, needs_statistics
    from ffsplit.variant.shards import read_shard_spec, save_shard

    target = Path(out)
    if target.is_dir():
        return {**_summary(read_shard_spec(target)), "path": out, "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    threads = set_task_threads()
    device = task_device()
    config = Recipe.from_dict(recipe)
    stats = None
    if stats_path is not None:
        stats = _stats(stats_path)
        if stats.meta.get("model_sha256") != model_sha256:
            raise FFSplitError(f"{stats_path}: statistics of another model; clear the stale cache")
    elif needs_statistics(config):
        raise FFSplitError(f"recipe '{config.label}' needs calibration statistics; none were given")
    net, _, _ = base_model(model, model_sha256, device)
    adapter = get_adapter(net)
    handles = {h.layer: h for h in adapter.ffns(net)}
    results = {}
    for layer in layers:
        if layer not in handles:
            raise FFSplitError(
                f"model {model!r} has no FFN layer {layer} (has 0..{len(handles) - 1})"
            )
        weights = adapter.weights(net, handles[layer])
        layer_stats = None if stats is None else stats.layers.get(layer)
        if stats is not None and layer_stats is None:
            raise FFSplitError(f"{stats_path}: no statistics for layer {layer}")
        results[layer] = compress_layer(weights, layer_stats, config, layer)
    seconds = time.perf_counter() - started
    try:
        save_shard(
            results,
            target,
            recipe=config.to_dict(),
            meta={
                "model_sha256": model_sha256,
                "seconds": seconds,
                "device": device,
                "threads": threads,
            },
        )
    except (FileExistsError, FFSplitError):  # a concurrent run wrote the same shard first
        if not target.is_dir():
            raise
        return {**_summary(read_shard_spec(target)), "path": out, "cached": True, "seconds": 0.0}
    return {
        **_summary(read_shard_spec(target)),
        "path": out,
        "cached": False,
        "seconds": time.perf_counter() - started,
    }


def _summary(spec: dict[str, Any]) -> dict[str, Any]:
    reports = [entry["report"] for entry in spec["layers"].values()]
    return {
        "layers": sorted(int(k) for k in spec["layers"]),
        "dense_bytes": sum(r["dense_bytes"] for r in reports),
        "bytes": sum(r["bytes"] for r in reports),
        "compress_seconds": spec.get("meta", {}).get("seconds"),
    }


def shard_plan(
    model_sha256: str,
    stats_key: str | None,
    recipe: dict[str, Any],
    shards: list[list[int]],
    cache_dir: str,
) -> list[dict[str, Any]]:
    """Key and output folder of every shard of a recipe."""
    root = Path(cache_dir)
    plan = []
    for layers in shards:
        key = cache.shard_key(model_sha256, stats_key, recipe, layers)
        plan.append({"layers": layers, "key": key, "path": str(cache.shard_dir(root, key))})
    return plan


def run_shard(
    model: str,
    model_sha256: str,
    stats_path: str | None,
    recipe: dict[str, Any],
    layers: list[int],
    out: str,
) -> dict[str, Any]:
    """One shard on Ray; a cache hit returns at once without touching Ray."""
    from ffsplit.variant.shards import read_shard_spec

    if Path(out).is_dir():
        return {**_summary(read_shard_spec(out)), "path": out, "cached": True, "seconds": 0.0}
    return run_remote(
        compress_shard_job,
        model,
        model_sha256,
        stats_path,
        recipe,
        layers,
        out,
        resources=task_resources(cpus=1),
    )


@prefect_task(name="compress-shard")
def compress_shard(
    model: str,
    model_sha256: str,
    stats_path: str | None,
    recipe: dict[str, Any],
    layers: list[int],
    out: str,
) -> dict[str, Any]:
    """Prefect task: one shard of compressed layers, computed on Ray (cached by content)."""
    return run_shard(model, model_sha256, stats_path, recipe, layers, out)
