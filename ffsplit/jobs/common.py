"""What every job shares: loading a base model or a variant, progress, calibration windows,
checks of statistics against a model, and the record of the machine a job ran on."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffsplit.adapters import Adapter, get_adapter
from ffsplit.config import (
    ProfileConfig,
)
from ffsplit.errors import FFSplitError
from ffsplit.files import check_output_path, shown
from ffsplit.profiling import ModelStats
from ffsplit.variant import load_variant
from ffsplit.variant.manifest import MANIFEST

Progress = Callable[[str, int, int], None]


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def is_variant(path: str | Path) -> bool:
    """A folder with a manifest entry (of any kind: a damaged one is load_variant's to refuse, with
    its own message, rather than a reason to read the folder as a base model)."""
    return os.path.lexists(Path(path) / MANIFEST)


def checked_output(out: str | Path, overwrite: bool = False, what: str = "output") -> Path:
    """The output path of a job, refused before any work when it cannot be written (a file
    under a file, a read-only place, control characters, a name too long; ffsplit.files)."""
    out = Path(out)
    if overwrite:
        return out
    if out.exists():
        raise FFSplitError(f"{what} {shown(out)} already exists; choose another --out or remove it")
    return check_output_path(out, what)


def load_any(
    model_or_dir: str | Path, device: str = "cpu"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A base model (packaged name or HF folder) or a variant folder, with a description."""
    if is_variant(model_or_dir):
        model, tokenizer, manifest = load_variant(model_or_dir, device=device)
        return (
            model,
            tokenizer,
            {"kind": "variant", "path": str(model_or_dir), "manifest": manifest},
        )
    from ffsplit.models.loading import load_model

    model, tokenizer, ref = load_model(str(model_or_dir), device=device)
    return model, tokenizer, {"kind": "base", "base_model": ref.to_dict()}


def _adapter_of(net: nn.Module, model: str | Path) -> Adapter:
    """The model's adapter; an unsupported architecture names the model it came from."""
    try:
        return get_adapter(net)
    except FFSplitError as exc:
        raise FFSplitError(f"{model}: {exc}") from None


def _require_tokenizer(tokenizer: Any, model: str | Path, why: str) -> None:
    if tokenizer is None:
        raise FFSplitError(f"{model}: no tokenizer files; {why}")


def _check_stats_fit(stats: ModelStats, net: nn.Module, adapter: Adapter, path: str | Path) -> None:
    """Statistics must cover every FFN of this model, neuron for neuron."""
    for handle in adapter.ffns(net):
        layer = stats.layers.get(handle.layer)
        if layer is None:
            raise FFSplitError(
                f"{path}: no statistics for layer {handle.layer} (the file covers layers "
                f"{sorted(stats.layers)}); profile every layer of the model"
            )
        neurons = adapter.weights(net, handle).neurons
        if layer.neurons != neurons:
            raise FFSplitError(
                f"{path}: layer {handle.layer} has statistics for {layer.neurons} neurons, the "
                f"model's FFN has {neurons}; they were collected on another model"
            )


def calibration_data(
    tokenizer: Any, config: ProfileConfig, shard: tuple[int, int] | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows (optionally one shard of them: windows i, i+n, i+2n, ...)."""
    from ffsplit.data.windows import calibration_windows

    windows, ref = calibration_windows(tokenizer, config.corpus, config.tokens, config.window)
    info = ref.to_dict()
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise FFSplitError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        windows = windows[index::count]
        info["shard"] = [index, count]
    return windows, info


def run_environment(device: str = "cpu") -> dict[str, Any]:
    """What ran a job: host, Python, torch/transformers, device and threads, git commit, date."""
    import os
    import platform
    import socket
    import subprocess
    from datetime import UTC, datetime

    import transformers

    from ffsplit.variant.manifest import git_commit

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    if info["commit"]:
        try:
            status = subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            )
            info["worktree_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    info["date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    return info
