"""Assemble stage: every shard's split modules into the base model, and the variant folder written.

The body is the library's own step (ffsplit.compress.recipe.apply_layers, then save_variant), so
the folder is what `ffsplit compress` writes for the same layers. It is written atomically, so an
interrupted assembly leaves nothing that looks finished; its path is content-keyed by the base
model and the shards.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from ffsplit.config import Recipe
from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.records import BaseModel, VariantFolder, read_variant
from tasks.runtime import base_model, set_task_threads, task_resources
from tasks.stage import stage


def variant_path(cache_dir: str, model: BaseModel, shard_keys: list[str]) -> str:
    """Where the variant assembled from these shards lives in the cache."""
    return str(cache.variant_dir(Path(cache_dir), cache.variant_key(model.sha256, shard_keys)))


def finished_variant(out: str, **_: Any) -> VariantFolder | None:
    """The record of a variant folder already written, else None."""
    from ffsplit.variant.manifest import MANIFEST

    if not (Path(out) / MANIFEST).is_file():
        return None
    return read_variant(out, cached=True, seconds=0.0)


@stage("assemble", done=finished_variant, resources=lambda **_: task_resources(cpus=1, gpu=False))
def assemble(
    *,
    model: BaseModel,
    recipe: dict[str, Any],
    shard_paths: list[str],
    out: str,
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> VariantFolder:
    """Base model + shards -> variant folder (apply_layers, save_variant; atomic)."""
    from ffsplit.adapters import get_adapter
    from ffsplit.compress.recipe import apply_layers
    from ffsplit.variant.io import save_variant
    from ffsplit.variant.shards import load_shard

    started = time.perf_counter()
    set_task_threads()
    config = Recipe.from_dict(recipe)
    cached_net, tokenizer, ref = base_model(model.name, model.sha256)
    net = copy.deepcopy(cached_net)  # swapping modules must not touch the worker's shared copy
    adapter = get_adapter(net)
    layers: dict[int, Any] = {}
    compress_seconds = 0.0
    for path in shard_paths:
        shard = load_shard(path)
        if Recipe.from_dict(shard.recipe) != config:
            raise FFSplitError(
                f"{path}: shard was compressed by another recipe than this variant's"
            )
        compress_seconds += float(shard.meta.get("seconds") or 0.0)
        for index, result in shard.layers.items():
            if index in layers:
                raise FFSplitError(f"{path}: layer {index} is in more than one shard")
            layers[index] = result
    try:
        report = apply_layers(net, layers, config, adapter=adapter, seconds=compress_seconds)
    except FFSplitError as exc:
        raise FFSplitError(f"assemble {model.name!r}: {exc}") from None
    try:
        save_variant(
            net,
            tokenizer,
            out,
            adapter=adapter,
            base_model=ref.to_dict(),
            report=report,
            layers=layers,
            calibration=calibration,
            extra=extra,
        )
    except (FileExistsError, FFSplitError):  # a concurrent run assembled the same variant first
        done = finished_variant(out)
        if done is None:
            raise
        return done
    return read_variant(out, cached=False, seconds=time.perf_counter() - started)
