"""Assemble stage: swap every shard's split modules into the base model and write the variant folder.

The folder is written atomically (ffsplit.variant.io.save_variant), so an interrupted assembly
leaves nothing that looks finished; its path is content-keyed by the base model and the shards.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from tasks.runtime import base_model, prefect_task, run_remote, set_task_threads, task_resources


def variant_summary(folder: str | Path) -> dict[str, Any]:
    """What the flows need of a finished variant folder, from its manifest alone."""
    from ffsplit.config import Recipe
    from ffsplit.variant.manifest import read_manifest

    manifest = read_manifest(folder)
    sizes = manifest["sizes"]
    summary = {
        "path": str(folder),
        "label": Recipe.from_dict(manifest["recipe"]).label,
        "ffn_reduction": sizes["ffn_reduction"],
        "dense_ffn_bytes": sizes["dense_ffn_bytes"],
        "ffn_bytes": sizes["ffn_bytes"],
        "compression_seconds": manifest.get("compression_seconds"),
    }
    heal = manifest.get("heal")
    if isinstance(heal, dict):  # a healed variant (tasks/heal.py): what healing did
        summary["heal"] = {k: heal.get(k) for k in ("loss", "steps", "before", "after", "seconds")}
    return summary


def assemble_job(
    model: str,
    model_sha256: str,
    recipe: dict[str, Any],
    shard_paths: list[str],
    out: str,
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ray task body: base model + shards -> variant folder (atomic)."""
    from ffsplit.adapters import get_adapter
    from ffsplit.compress.results import CompressionReport
    from ffsplit.split.apply import swap_ffn
    from ffsplit.variant.io import save_variant
    from ffsplit.variant.manifest import MANIFEST
    from ffsplit.variant.shards import load_shard

    target = Path(out)
    if (target / MANIFEST).is_file():
        return {**variant_summary(target), "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    set_task_threads()
    cached_net, tokenizer, ref = base_model(model, model_sha256)
    net = copy.deepcopy(cached_net)  # swapping modules must not touch the worker's shared copy
    adapter = get_adapter(net)
    handles = {h.layer: h for h in adapter.ffns(net)}
    layers: dict[int, Any] = {}
    compress_seconds = 0.0
    for path in shard_paths:
        shard = load_shard(path)
        if shard.recipe != recipe:
            raise FFSplitError(
                f"{path}: shard was compressed by another recipe than this variant's"
            )
        compress_seconds += float(shard.meta.get("seconds") or 0.0)
        for index, result in shard.layers.items():
            if index in layers:
                raise FFSplitError(f"{path}: layer {index} is in more than one shard")
            if index not in handles:
                raise FFSplitError(f"{path}: layer {index} does not exist in model {model!r}")
            swap_ffn(net, adapter, handles[index], result.modules)
            layers[index] = result
    missing = sorted(set(handles) - set(layers))
    if missing:
        raise FFSplitError(f"assemble: no shard holds layers {missing}; every FFN needs one")
    reports = [layers[i].report for i in sorted(layers)]
    report = CompressionReport(
        recipe=recipe,
        layers=reports,
        dense_ffn_bytes=sum(r.dense_bytes for r in reports),
        ffn_bytes=sum(r.bytes for r in reports),
        seconds=compress_seconds,
    )
    try:
        save_variant(
            net,
            tokenizer,
            target,
            adapter=adapter,
            base_model=ref.to_dict(),
            report=report,
            layers=layers,
            calibration=calibration,
            extra=extra,
        )
    except (FileExistsError, FFSplitError):  # a concurrent run assembled the same variant first
        if not (target / MANIFEST).is_file():
            raise
        return {**variant_summary(target), "cached": True, "seconds": 0.0}
    return {**variant_summary(target), "cached": False, "seconds": time.perf_counter() - started}


def run_assemble(
    model: str,
    model_sha256: str,
    recipe: dict[str, Any],
    shard_paths: list[str],
    out: str,
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble on Ray; a finished folder returns at once without touching Ray."""
    from ffsplit.variant.manifest import MANIFEST

    if (Path(out) / MANIFEST).is_file():
        return {**variant_summary(out), "cached": True, "seconds": 0.0}
    return run_remote(
        assemble_job,
        model,
        model_sha256,
        recipe,
        shard_paths,
        out,
        calibration,
        extra,
        resources=task_resources(cpus=1, gpu=False),
    )


@prefect_task(name="assemble")
def assemble(
    model: str,
    model_sha256: str,
    recipe: dict[str, Any],
    shard_paths: list[str],
    out: str,
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prefect task: the variant folder of a recipe from its shards (cached by content)."""
    return run_assemble(model, model_sha256, recipe, shard_paths, out, calibration, extra)
