"""Compress a base model by a recipe into a variant folder (profiling here when needed, healing
when the recipe asks)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from ffsplit.adapters import Adapter
from ffsplit.compress.recipe import check_budget, compress_model
from ffsplit.config import (
    Recipe,
)
from ffsplit.errors import FFSplitError
from ffsplit.jobs.common import (
    Progress,
    _adapter_of,
    _check_stats_fit,
    _require_tokenizer,
    _stage,
    calibration_data,
    checked_output,
    load_any,
)
from ffsplit.jobs.heal import _heal_summary, heal_model
from ffsplit.profiling import ModelStats, load_stats, profile_model
from ffsplit.variant import save_variant


def _statistics(
    stats: ModelStats | None,
    stats_path: str | Path | None,
    recipe: Recipe,
    model: str | Path,
    net: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    base: dict[str, Any],
    progress: Progress | None,
) -> tuple[ModelStats | None, dict[str, Any] | None]:
    """(statistics, calibration record): the given file's, checked against this model, else
    profiled here when the recipe reads statistics, else none."""
    if stats is not None:
        if stats.meta.get("model_sha256") not in (None, base["weights_sha256"]):
            raise FFSplitError(
                f"{stats_path}: statistics were collected on another model "
                f"(sha256 {str(stats.meta.get('model_sha256'))[:12]}..., this model "
                f"{base['weights_sha256'][:12]}...)"
            )
        _check_stats_fit(stats, net, adapter, str(stats_path))
        return stats, stats.meta.get("calibration")
    if not recipe.needs_statistics:
        return None, None
    _require_tokenizer(
        tokenizer, model, "this recipe profiles calibration text: add them or pass statistics"
    )
    windows, calibration = calibration_data(tokenizer, recipe.profile)
    profiled = profile_model(
        net,
        windows,
        recipe.profile,
        progress=_stage(progress, "profile"),
        meta={"model_sha256": base["weights_sha256"]},
    )
    return profiled, calibration


def compress_job(
    model: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    stats_path: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress a base model by a recipe and write a variant folder.

    Statistics come from stats_path, or are profiled here (recipe.profile) when the recipe needs
    them and none were given.
    """
    started = time.perf_counter()
    out = checked_output(out, overwrite, "output folder")
    # A damaged statistics file fails before the (slow) model load.
    stats: ModelStats | None = None if stats_path is None else load_stats(stats_path)
    net, tokenizer, info = load_any(model, device=device)
    if info["kind"] != "base":
        raise FFSplitError(f"{model}: compress a base model, not an already compressed variant")
    base = info["base_model"]
    adapter = _adapter_of(net, model)
    check_budget(net, recipe, adapter)  # an impossible budget fails before profiling
    stats, calibration = _statistics(
        stats, stats_path, recipe, model, net, tokenizer, adapter, base, progress
    )
    profile_seconds = 0.0 if stats is None or stats_path else float(stats.meta["seconds"])
    if recipe.heal.enabled:
        _require_tokenizer(tokenizer, model, "healing distills on calibration text")
        dense = copy.deepcopy(net)  # the teacher: the base model as it was before compression
    report, layers = compress_model(
        net, stats, recipe, adapter=adapter, progress=_stage(progress, "compress")
    )
    extra: dict[str, Any] = {"profile_seconds": profile_seconds}
    if recipe.heal.enabled:
        extra["heal"] = heal_model(dense, net, tokenizer, recipe.heal, adapter, progress)
        del dense
    save_variant(
        net,
        tokenizer,
        out,
        adapter=adapter,
        base_model=base,
        report=report,
        layers=layers,
        calibration=calibration,
        extra=extra,
        overwrite=overwrite,
    )
    result = {
        "path": str(out),
        "label": recipe.label,
        "ffn_reduction": report.ffn_reduction,
        "dense_ffn_bytes": report.dense_ffn_bytes,
        "ffn_bytes": report.ffn_bytes,
        "profile_seconds": profile_seconds,
        "compress_seconds": report.seconds,
        "seconds": time.perf_counter() - started,
    }
    if recipe.heal.enabled:
        result.update(_heal_summary(extra["heal"]))
    return result
