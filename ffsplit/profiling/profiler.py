"""Run a model over calibration windows and collect per-neuron statistics through hooks.

Hooks read the FFN input (up projection's input) and the hidden activation (down projection's
input); the model's forward is untouched. Accumulators live on the model's device; memory is
bounded by layer shapes, never by the number of tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ffsplit.adapters import Adapter, get_adapter
from ffsplit.config import ProfileConfig
from ffsplit.profiling.stats import LayerStats, ModelStats, hit_top_k, observe

Progress = Callable[[int, int], None]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class StatHooks:
    """Statistics accumulators of some FFN layers and the hooks that fill them during forwards."""

    stats: dict[int, LayerStats]
    handles: list[RemovableHandle] = field(default_factory=list)

    def collected(self) -> dict[int, LayerStats]:
        """The statistics gathered so far, on the CPU, Grams made symmetric (what files keep)."""
        return {i: s.to_device("cpu").symmetric() for i, s in self.stats.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach_stat_hooks(
    model: nn.Module, adapter: Adapter, config: ProfileConfig, layers: Iterable[int] | None = None
) -> StatHooks:
    """Hook the FFNs of `layers` (default all) so every forward accumulates their statistics.

    Accumulators live on each layer's own device, so a model whose other layers are still on the
    meta device (a layer group, profiling/sequential.py) is hooked the same way as a whole model.
    """
    handles = adapter.ffns(model)
    wanted = set(range(len(handles))) if layers is None else set(layers)
    hooks = StatHooks({})
    pending_x: dict[int, Tensor] = {}
    for handle in handles:
        if handle.layer not in wanted:
            continue
        w = adapter.weights(model, handle)
        device = w.down.device
        down_norms = w.down.float().norm(dim=0).to(device)
        hooks.stats[handle.layer] = LayerStats.zeros(
            w.neurons, w.hidden, hit_top_k(w.neurons, config.hit_top_fraction), config.collect_grams
        ).to_device(device)

        def on_up(_mod: nn.Module, args: tuple, i: int = handle.layer) -> None:
            pending_x[i] = args[0].reshape(-1, args[0].shape[-1])

        def on_down(
            _mod: nn.Module, args: tuple, i: int = handle.layer, norms: Tensor = down_norms
        ) -> None:
            h = args[0].reshape(-1, args[0].shape[-1])
            observe(hooks.stats[i], pending_x.pop(i), h, norms)

        hooks.handles.append(model.get_submodule(handle.up_path).register_forward_pre_hook(on_up))
        hooks.handles.append(
            model.get_submodule(handle.down_path).register_forward_pre_hook(on_down)
        )
    return hooks


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
    device = _device_of(model)
    hooks = attach_stat_hooks(model, adapter, config, layers)
    started = time.perf_counter()
    try:
        n = windows.shape[0]
        for start in range(0, n, config.batch_size):
            batch = windows[start : start + config.batch_size].to(device)
            model(input_ids=batch)
            if progress is not None:
                progress(min(start + config.batch_size, n), n)
    finally:
        hooks.remove()
    seconds = time.perf_counter() - started
    info = {
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "window": int(windows.shape[1]),
        "profile": config.to_dict(),
        "seconds": seconds,
        **(meta or {}),
    }
    return ModelStats(hooks.collected(), info)
