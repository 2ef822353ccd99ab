"""Compress stage: one Ray task per shard of layers, each writing a safetensors shard folder.

The body is the library's own step (ffsplit.compress.recipe.compress_layers) on the worker's
copy of the base model, so a shard's layers are exactly what `ffsplit compress` computes for them;
a layer's result does not depend on which worker, or how many, computed it (tasks run a fixed
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
from tasks.records import BaseModel, Shard
from tasks.runtime import (
    WORKER_CACHES,
    base_model,
    set_task_threads,
    task_device,
    task_resources,
)
from tasks.stage import stage

_STATS: OrderedDict[str, Any] = OrderedDict()  # merged statistics, one file per worker process
WORKER_CACHES.append(_STATS)


def layer_shards(num_layers: int, shards: int) -> list[list[int]]:
    """Consecutive layer groups, as even as possible: shard i gets layers [a_i, a_{i+1})."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise FFSplitError(f"compress_shards must be a positive integer, got {shards!r}")
    shards = min(shards, num_layers)
    bounds = [round(i * num_layers / shards) for i in range(shards + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(shards)]


def shard_path(
    cache_dir: str, model: BaseModel, stats_key: str | None, recipe: Recipe, layers: list[int]
) -> str:
    """Where a shard of this recipe lives in the cache (its key: everything it depends on)."""
    key = cache.shard_key(model.sha256, stats_key, recipe.key_dict(), layers)
    return str(cache.shard_dir(Path(cache_dir), key))


def _stats(path: str) -> Any:
    from ffsplit.profiling import load_stats

    if path not in _STATS:
        _STATS.clear()  # free the previous statistics (Gram matrices: ~650 MB for SmolLM2)
        _STATS[path] = load_stats(path)
    return _STATS[path]


def finished_shard(out: str, **_: Any) -> Shard | None:
    """The record of a shard folder already written, else None."""
    from ffsplit.variant.shards import read_shard_spec

    if not Path(out).is_dir():
        return None
    return _record(read_shard_spec(out), out, cached=True, seconds=0.0)


def _record(spec: dict[str, Any], out: str, cached: bool, seconds: float) -> Shard:
    reports = [entry["report"] for entry in spec["layers"].values()]
    return Shard(
        path=out,
        layers=tuple(sorted(int(k) for k in spec["layers"])),
        cached=cached,
        seconds=seconds,
        dense_bytes=sum(r["dense_bytes"] for r in reports),
        bytes=sum(r["bytes"] for r in reports),
        compress_seconds=spec.get("meta", {}).get("seconds"),
        device=spec.get("meta", {}).get("device"),
    )


@stage(
    "compress-shard",
    done=finished_shard,
    resources=lambda **_: task_resources(cpus=1),
)
def compress_shard(
    *,
    model: BaseModel,
    stats_path: str | None,
    recipe: dict[str, Any],
    layers: list[int],
    out: str,
) -> Shard:
    """Compress `layers` of the base model by the recipe (compress_layers) and write one shard."""
    from ffsplit.compress.recipe import compress_layers
    from ffsplit.variant.shards import read_shard_spec, save_shard

    started = time.perf_counter()
    threads = set_task_threads()
    device = task_device()
    config = Recipe.from_dict(recipe)
    stats = None
    if stats_path is not None:
        stats = _stats(stats_path)
        if stats.meta.get("model_sha256") != model.sha256:
            raise FFSplitError(f"{stats_path}: statistics of another model; clear the stale cache")
    net, _, _ = base_model(model.name, model.sha256, device)
    try:
        results = compress_layers(net, stats, config, layers)
    except FFSplitError as exc:
        raise FFSplitError(f"model {model.name!r}: {exc}") from None
    seconds = time.perf_counter() - started
    meta = {"model_sha256": model.sha256, "seconds": seconds, "device": device, "threads": threads}
    try:
        save_shard(results, out, recipe=config.to_dict(), meta=meta)
    except (FileExistsError, FFSplitError):  # a concurrent run wrote the same shard first
        done = finished_shard(out)
        if done is None:
            raise
        return done
    return _record(read_shard_spec(out), out, cached=False, seconds=time.perf_counter() - started)
