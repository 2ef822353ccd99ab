"""Build split projections from canonical FFN weights and swap them into a model in place.

A split FFN is a sequence of neuron blocks (heavy first, then light blocks), each block turned
into one part per projection by a compressor. Permuting neurons is exact because the activation
is elementwise, so with dense blocks the split FFN equals the dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNHandle, FFNWeights
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import DenseLinear, LinearPart


@dataclass(frozen=True)
class BlockParts:
    """The parts standing for one neuron block in each projection."""

    up: LinearPart
    gate: LinearPart | None
    down: LinearPart


BlockCompressor = Callable[[FFNWeights, Tensor], BlockParts]


def restrict(weights: FFNWeights, neurons: Tensor) -> FFNWeights:
    """The FFN restricted to some neurons (in the given order); the output bias is left out."""
    idx = neurons.to(weights.up.device)

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, idx)

    return FFNWeights(
        up=weights.up.index_select(0, idx),
        gate=rows(weights.gate),
        down=weights.down.index_select(1, idx),
        up_bias=rows(weights.up_bias),
        gate_bias=rows(weights.gate_bias),
        down_bias=None,
    )


def dense_block(block: FFNWeights, neurons: Tensor) -> BlockParts:
    """Keep a block exactly (the heavy part; or the identity compressor)."""
    gate = None if block.gate is None else DenseLinear(block.gate, block.gate_bias)
    return BlockParts(DenseLinear(block.up, block.up_bias), gate, DenseLinear(block.down))


def build_split(
    weights: FFNWeights,
    blocks: Sequence[tuple[Tensor, BlockCompressor]],
) -> tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection]:
    """Split projections from (neuron indices, compressor) blocks; empty blocks are skipped.

    Neurons not in any block are pruned.
    """
    parts: list[BlockParts] = []
    for neurons, compressor in blocks:
        if neurons.numel() == 0:
            continue
        parts.append(compressor(restrict(weights, neurons), neurons))
    if not parts:
        raise ValueError("every neuron of the FFN would be pruned")
    up = SplitOutProjection([p.up for p in parts])
    gate = None
    if weights.gate is not None:
        gate = SplitOutProjection([p.gate for p in parts])  # type: ignore[misc]
    down = SplitInProjection([p.down for p in parts], weights.down_bias)
    return up, gate, down


def swap_ffn(
    model: nn.Module,
    adapter: Adapter,
    handle: FFNHandle,
    modules: tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection],
) -> None:
    """Swap one FFN's projections for split ones (parts already hold the model's float dtype)."""
    up, gate, down = modules
    adapter.replace(model, handle, up=up, gate=gate, down=down)


def ffn_modules(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """Every FFN projection module of a model (for size accounting)."""
    return [model.get_submodule(p) for h in adapter.ffns(model) for p in h.projection_paths]
