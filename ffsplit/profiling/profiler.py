"""Run a model over calibration windows and collect per-neuron statistics through hooks.

Hooks read the FFN input (up projection's input) and the hidden activation (down projection's
input); the model's forward is untouched. Accumulators live on the model's device; memory is
bounded by layer shapes, never by the number of tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, get_adapter
from ffsplit.config import ProfileConfig
from ffsplit.profiling.stats import LayerStats, ModelStats, hit_top_k, observe

Progress = Callable[[int, int], None]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()  # not inference_mode: the statistics must stay ordinary tensors
def profile_model(
    model: nn.Module,
    windows: Tensor,
    config: ProfileConfig | None = None,
    *,
    adapter: Adapter | None = None,
    layers: Sequence[int] | None = None,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> ModelStats:
    """Statistics of the FFN neurons of `layers` (default all) over token windows [n, T]."""
    config = config or ProfileConfig()
    adapter = adapter or get_adapter(model)
    handles = adapter.ffns(model)
    wanted = set(range(len(handles))) if layers is None else set(layers)
    device = _device_of(model)
    stats: dict[int, LayerStats] = {}
    pending_x: dict[int, Tensor] = {}
    hooks = []
    for handle in handles:
        if handle.layer not in wanted:
            continue
        w = adapter.weights(model, handle)
        down_norms = w.down.float().norm(dim=0).to(device)
        stats[handle.layer] = LayerStats.zeros(
            w.neurons, w.hidden, hit_top_k(w.neurons, config.hit_top_fraction), config.collect_grams
        ).to_device(device)

        def on_up(_mod: nn.Module, args: tuple, i: int = handle.layer) -> None:
            pending_x[i] = args[0].reshape(-1, args[0].shape[-1])

        def on_down(_mod: nn.Module, args: tuple, i: int = handle.layer, norms: Tensor = down_norms) -> None:
            h = args[0].reshape(-1, args[0].shape[-1])
            observe(stats[i], pending_x.pop(i), h, norms)

        hooks.append(model.get_submodule(handle.up_path).register_forward_pre_hook(on_up))
        hooks.append(model.get_submodule(handle.down_path).register_forward_pre_hook(on_down))
    started = time.perf_counter()
    try:
        n = windows.shape[0]
        for start in range(0, n, config.batch_size):
            batch = windows[start : start + config.batch_size].to(device)
            model(input_ids=batch)
            if progress is not None:
                progress(min(start + config.batch_size, n), n)
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - started
    info = {
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "window": int(windows.shape[1]),
        "profile": config.to_dict(),
        "seconds": seconds,
        **(meta or {}),
    }
    return ModelStats({i: s.to_device("cpu") for i, s in stats.items()}, info)
