"""Model-side observation: zero chosen neurons, or count per-token coverage, through hooks.

Both work with forward pre-hooks on the down projection (its input is the hidden activation h),
so the model's forward is never rewritten (style.md, 2) and the model is back to dense the moment
the context exits. The ablation compares zeroing the top neurons by score against zeroing a
random set of the same size (issue 6: the paper's premise, the heavy neurons matter most).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNHandle, get_adapter
from ffsplit.analysis.observation import CoverageCounts, coverage_counts
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import ModelStats
from ffsplit.selection import neuron_scores, order_by_score, random_order, score_order


def _handles(model: nn.Module, adapter: Adapter, layers: Any) -> dict[int, FFNHandle]:
    handles = {h.layer: h for h in adapter.ffns(model)}
    unknown = sorted(set(layers) - set(handles))
    if unknown:
        raise FFSplitError(
            f"layers {unknown} are not FFN layers of this model (it has 0..{len(handles) - 1})"
        )
    return handles


def _neuron_count(model: nn.Module, adapter: Adapter, handle: FFNHandle) -> int:
    """m, read through the adapter (Conv1D and split projections included)."""
    return int(adapter.weights(model, handle).down.shape[1])


def down_weights(model: nn.Module, adapter: Adapter | None = None) -> dict[int, Tensor]:
    """The down projection [d, m] of every FFN layer: what the observation's scores need."""
    adapter = adapter or get_adapter(model)
    return {h.layer: adapter.weights(model, h).down for h in adapter.ffns(model)}


@contextlib.contextmanager
def zero_neurons(
    model: nn.Module, adapter: Adapter, neurons_per_layer: Mapping[int, Tensor]
) -> Iterator[None]:
    """Inside the context, the given neurons of each layer contribute nothing to the FFN output.

    Indices are positions in the down projection's input (the model's own neuron order for an
    uncompressed model). Equivalent to zeroing those columns of the down weight; the bias stays.
    The hooks are removed on exit, also on error.
    """
    handles = _handles(model, adapter, neurons_per_layer)
    removable = []
    try:
        for layer, neurons in neurons_per_layer.items():
            handle = handles[layer]
            index = torch.as_tensor(neurons, dtype=torch.long).flatten()
            width = _neuron_count(model, adapter, handle)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
                raise FFSplitError(
                    f"layer {layer}: neuron indices span [{int(index.min())}, {int(index.max())}] "
                    f"but the FFN has {width} neurons"
                )
            if index.numel() == 0:
                continue

            def hook(_module: nn.Module, args: tuple, index: Tensor = index) -> tuple:
                h = args[0]
                # out-of-place: the input may be needed by other hooks or autograd
                return (h.index_fill(-1, index.to(h.device), 0), *args[1:])

            module = model.get_submodule(handle.down_path)
            removable.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for r in removable:
            r.remove()


def ablation_sets(
    model: nn.Module,
    adapter: Adapter,
    stats: ModelStats,
    fraction: float = 0.01,
    seed: int = 0,
    random_repeats: int = 3,
) -> dict[str, Any]:
    """The neuron sets the ablation zeroes, per layer: top and bottom by score, and random sets.

    Random set r uses selection.random_order with seed + r (it may include heavy neurons, as a
    random choice would).
    """
    if not 0 < fraction < 1:
        raise FFSplitError(f"ablation: fraction must be in (0, 1), got {fraction}")
    if random_repeats < 1:
        raise FFSplitError(f"ablation: random_repeats must be >= 1, got {random_repeats}")
    handles = _handles(model, adapter, stats.layers)
    top: dict[int, Tensor] = {}
    bottom: dict[int, Tensor] = {}
    for i in sorted(stats.layers):
        down = adapter.weights(model, handles[i]).down
        scores = neuron_scores(stats.layers[i], down).cpu()
        heavy, _ = score_order(scores, fraction)
        top[i] = heavy
        bottom[i] = order_by_score(scores).flip(0)[: heavy.numel()]
    seeds = [seed + r for r in range(random_repeats)]
    randoms = [
        {i: random_order(stats.layers[i].neurons, fraction, s, i)[0] for i in sorted(stats.layers)}
        for s in seeds
    ]
    return {"top": top, "bottom": bottom, "random": randoms, "seeds": seeds}


def ablation(
    model: nn.Module,
    adapter: Adapter,
    stats: ModelStats,
    evaluate: Callable[[nn.Module], float],
    fraction: float = 0.01,
    seed: int = 0,
    random_repeats: int = 3,
    bottom: bool = True,
    metric: str | None = None,
    higher_is_better: bool | None = None,
) -> dict[str, Any]:
    """Quality with the top `fraction` of neurons (by score) zeroed in every layer, against a
    random `fraction` (several seeds) and, with bottom=True, the lowest-scoring `fraction`.

    evaluate(model) -> one number (perplexity for causal LMs, probe accuracy for encoders); metric
    and higher_is_better, when given, are recorded so the result describes itself. Returns plain
    numbers: dense, top, bottom, random (one per seed), random_mean, random_std, seeds, fraction
    and neurons zeroed per layer.
    """
    sets = ablation_sets(model, adapter, stats, fraction, seed, random_repeats)
    out: dict[str, Any] = {
        "fraction": fraction,
        "layers": sorted(stats.layers),
        "neurons_zeroed_per_layer": {str(i): int(t.numel()) for i, t in sets["top"].items()},
        "seeds": sets["seeds"],
    }
    if metric is not None:
        out["metric"] = metric
    if higher_is_better is not None:
        out["higher_is_better"] = bool(higher_is_better)
    out["dense"] = float(evaluate(model))
    with zero_neurons(model, adapter, sets["top"]):
        out["top"] = float(evaluate(model))
    if bottom:
        with zero_neurons(model, adapter, sets["bottom"]):
            out["bottom"] = float(evaluate(model))
    randoms = []
    for chosen in sets["random"]:
        with zero_neurons(model, adapter, chosen):
            randoms.append(float(evaluate(model)))
    out["random"] = randoms
    finite = [v for v in randoms if math.isfinite(v)]
    out["random_mean"] = statistics.fmean(finite) if finite else math.inf
    out["random_std"] = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return out


@contextlib.contextmanager
def count_coverage(
    model: nn.Module,
    adapter: Adapter,
    heavy: Mapping[int, Tensor],
    top_k: int | Mapping[int, int],
) -> Iterator[dict[int, CoverageCounts]]:
    """Inside the context every forward counts, per layer, how often the fixed heavy set holds a
    token's top-k output norms (observation.coverage_counts). Yields the live per-layer counts;
    use observation.coverage_summary on them afterwards. Hooks are removed on exit.
    """
    handles = _handles(model, adapter, heavy)
    counts: dict[int, CoverageCounts] = {}
    removable = []
    try:
        for layer, neurons in heavy.items():
            handle = handles[layer]
            down = adapter.weights(model, handle).down
            norms = down.detach().float().norm(dim=0)
            k = top_k if isinstance(top_k, int) else top_k[layer]
            index = torch.as_tensor(neurons, dtype=torch.long)

            def hook(
                _module: nn.Module,
                args: tuple,
                layer: int = layer,
                norms: Tensor = norms,
                index: Tensor = index,
                k: int = k,
            ) -> None:
                batch = coverage_counts(args[0].detach(), norms, index, k)
                counts[layer] = batch if layer not in counts else counts[layer].merged(batch)

            module = model.get_submodule(handle.down_path)
            removable.append(module.register_forward_pre_hook(hook))
        yield counts
    finally:
        for r in removable:
            r.remove()


def hidden_state_error(
    model: nn.Module, windows: Tensor, batch_size: int = 4
) -> Callable[[nn.Module], float]:
    """evaluate(net) -> ||H - H_dense||_F / ||H_dense||_F of the last hidden states over all windows.

    The dense reference H_dense is computed now, from `model` as it is. For encoders the probe
    refits on ablated features and hides much of the damage; the error of the encoder's output
    itself is the sensitive measure (0 for the dense model).
    """
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise FFSplitError("hidden_state_error: windows must be a non-empty 2-D tensor [n, T]")
    if batch_size < 1:
        raise FFSplitError(f"hidden_state_error: batch_size must be >= 1, got {batch_size}")

    def batches(net: nn.Module) -> Iterator[Tensor]:
        device = next(net.parameters()).device
        for i in range(0, windows.shape[0], batch_size):
            out = net(input_ids=windows[i : i + batch_size].to(device))
            yield out.last_hidden_state.float()

    with torch.inference_mode():
        reference = list(batches(model))

    @torch.inference_mode()
    def evaluate(net: nn.Module) -> float:
        diff = total = 0.0
        for out, ref in zip(batches(net), reference, strict=True):
            diff += float((out - ref).double().pow(2).sum())
            total += float(ref.double().pow(2).sum())
        if total == 0:
            return 0.0 if diff == 0 else math.inf
        return (diff / total) ** 0.5

    return evaluate
