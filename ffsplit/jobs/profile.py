"""Profile a base model on calibration text into a statistics file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ffsplit.config import (
    ProfileConfig,
)
from ffsplit.errors import FFSplitError
from ffsplit.jobs.common import (
    Progress,
    _adapter_of,
    _require_tokenizer,
    _stage,
    calibration_data,
    checked_output,
    load_any,
)
from ffsplit.profiling import profile_model, save_stats


def profile_job(
    model: str | Path,
    config: ProfileConfig,
    out: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    layers: list[int] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Profile a base model on calibration text and write a statistics file."""
    started = time.perf_counter()
    out = checked_output(out)
    net, tokenizer, info = load_any(model, device=device)
    if info["kind"] != "base":
        raise FFSplitError(f"{model}: profile a base model, not a compressed variant")
    _adapter_of(net, model)
    _require_tokenizer(tokenizer, model, "profiling needs it to tokenize calibration text")
    windows, calibration = calibration_data(tokenizer, config, shard)
    if windows.shape[0] == 0:
        raise FFSplitError(f"shard {shard} holds no calibration windows; use fewer shards")
    meta = {
        "base_model": info["base_model"],
        "model_sha256": info["base_model"]["weights_sha256"],
        "calibration": calibration,
    }
    stats = profile_model(
        net, windows, config, layers=layers, progress=_stage(progress, "profile"), meta=meta
    )
    path = save_stats(stats, out)
    return {
        "path": str(path),
        "tokens": int(windows.numel()),
        "layers": len(stats.layers),
        "seconds": time.perf_counter() - started,
        "profile_seconds": stats.meta["seconds"],
    }
