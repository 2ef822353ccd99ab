"""Neuron plans: the width of each neuron's vectors in one FFN, and the split modules they build.

A plan says, per neuron, the width of its up (and gate) rows and of its down column (16: kept
bf16). Every neuron-structured method of issue 17 is a plan: uniform (no split: every neuron
within one bit of the others, in index order), the classic split (heavy neurons at a high width,
light neurons over two adjacent widths in score order), the random split, the allocation
(allocation.py) and the column-outlier baseline (its up/gate rows also keep some input columns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.adapters import FFNWeights
from ffsplit.compress.budget import (
    DENSE_BITS,
    FFNShape,
    dense_ffn_bytes,
    neuron_plan_bytes,
    reduction,
    solve_two_levels,
)
from ffsplit.compress.outliers import outlier_columns, outlier_count
from ffsplit.compress.quant import (
    GPTQResult,
    gptq_keep_columns,
    gptq_neurons,
    quantize_groups,
    rtn_neurons,
    take_rows,
)
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats
from ffsplit.split.apply import BlockParts, build_split
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import (
    ColumnOutlierLinear,
    DenseLinear,
    LinearPart,
    QuantizedLinear,
    kept_column_bytes,
    to_storage,
)


@dataclass(frozen=True)
class NeuronPlan:
    """Widths of one FFN's neurons (16: dense bf16): up (and gate) rows, down column; ``order``
    lists the neurons most important first (score order, or index order for the baselines)."""

    up_gate: Tensor
    down: Tensor
    order: Tensor

    def blocks(self) -> list[tuple[Tensor, int, int]]:
        """(neurons, up/gate width, down width) per block, highest widths first, neurons in
        ``order`` within each block."""
        pairs = torch.stack([self.up_gate[self.order], self.down[self.order]], dim=1)
        unique = sorted({tuple(p) for p in pairs.tolist()}, key=lambda p: (-sum(p), -p[0]))
        out = []
        for row_bits, down_bits in unique:
            mask = (pairs[:, 0] == row_bits) & (pairs[:, 1] == down_bits)
            out.append((self.order[mask], int(row_bits), int(down_bits)))
        return out


def two_level_plan(
    order: Tensor, heavy: int, heavy_bits: int, light: Mapping[int, int]
) -> NeuronPlan:
    """The classic split: the first ``heavy`` neurons of ``order`` at ``heavy_bits``, then the light
    ones over the widths of ``light`` (highest first, as budget.solve_light_bits returns them)."""
    m = order.numel()
    if heavy + sum(light.values()) != m:
        raise FFSplitError(f"two_level_plan: {heavy} heavy + {dict(light)} light != {m} neurons")
    widths = torch.empty(m, dtype=torch.long)
    widths[order[:heavy]] = heavy_bits
    start = heavy
    for bits, count in light.items():
        widths[order[start : start + count]] = bits
        start += count
    return NeuronPlan(widths, widths.clone(), order)


def column_outlier_plan(
    shape: FFNShape,
    kept_down: Tensor,
    kept_in: int,
    target: float,
    group_size: int,
    ladder: Sequence[int],
) -> NeuronPlan:
    """The column-outlier baseline's widths: ``kept_down`` neurons keep a bf16 down column, up
    and gate keep ``kept_in`` bf16 input columns (their bytes: outliers.kept_column_bytes per
    block and matrix); every other vector over two adjacent widths of ``ladder`` in index order
    (no score), the most bytes with reduction ``>= target``."""
    m = shape.m
    order = torch.arange(m)
    down_kept = torch.zeros(m, dtype=torch.bool)
    down_kept[kept_down] = True
    rows_matrices = shape.matrices - 1

    def plan_of(high: int, low: int, count: int) -> NeuronPlan:
        widths = torch.full((m,), low, dtype=torch.long)
        widths[:count] = high
        return NeuronPlan(widths, torch.where(down_kept, DENSE_BITS, widths), order)

    def nbytes(plan: NeuronPlan) -> int:
        total = neuron_plan_bytes(shape, plan.up_gate.tolist(), plan.down.tolist(), group_size)
        blocks = plan.blocks()
        kept = sum(
            kept_column_bytes(n.numel(), kept_in) for n, bits, _ in blocks if bits != DENSE_BITS
        )
        return total + rows_matrices * kept

    dense = dense_ffn_bytes(shape)
    high, low, count = solve_two_levels(
        sorted(ladder, reverse=True),
        m,
        lambda h, lo, n: nbytes(plan_of(h, lo, n)),
        lambda b: reduction(dense, b) >= target,
    )
    return plan_of(high, low, count)


@dataclass(frozen=True)
class ColumnOutlierLayer:
    """The column-outlier baseline for one FFN: its widths, the FFN input columns that up and
    gate keep in bf16 (largest ``diag(gram_in)`` first) and the neurons whose down column stays
    bf16 (largest ``diag(gram_hidden)`` first)."""

    plan: NeuronPlan
    kept_in: Tensor
    kept_down: Tensor


def column_outlier_layer(
    shape: FFNShape,
    gram_in: Tensor,
    gram_hidden: Tensor,
    ratio: float,
    target: float,
    group_size: int,
    ladder: Sequence[int],
) -> ColumnOutlierLayer:
    """The column-outlier baseline of one FFN at FFN byte reduction ``target``: up/gate keep
    ``ceil(ratio * d)`` input columns and down ``ceil(ratio * m)`` neurons in bf16, picked by
    activation energy (outliers.outlier_columns), the rest over two adjacent widths of ``ladder``
    in index order (:func:`column_outlier_plan`). Build it with :func:`plan_blocks` and
    ``RowQuantizer(..., kept=layer.kept_in)``."""
    kept_in = outlier_columns(gram_in, outlier_count(shape.d, ratio))
    kept_down = outlier_columns(gram_hidden, outlier_count(shape.m, ratio))
    plan = column_outlier_plan(shape, kept_down, kept_in.numel(), target, group_size, ladder)
    return ColumnOutlierLayer(plan, kept_in, kept_down)


class RowQuantizer:
    """Quantizes blocks of up/gate rows of one FFN at given widths, by GPTQ (act-order) on the FFN
    input Gram, or round to nearest when ``gram`` is None; ``kept`` input columns stay 16-bit
    (the column-outlier baseline, outliers.py). GPTQ treats rows independently, so each width's
    whole matrix is quantized once and blocks are row slices of it (quant.take_rows): one run
    serves every plan, budget and method that uses this FFN."""

    def __init__(
        self,
        weights: FFNWeights,
        group_size: int,
        gram: Tensor | None,
        *,
        act_order: bool = True,
        kept: Tensor | None = None,
    ) -> None:
        self.matrices = {"up": weights.up, "gate": weights.gate}
        self.group_size = group_size
        self.gram = gram
        self.act_order = act_order
        self.kept = kept
        self._cache: dict[tuple[str, int], GPTQResult] = {}

    def _whole(self, name: str, bits: int) -> GPTQResult:
        key = (name, bits)
        if key not in self._cache:
            matrix = self.matrices[name]
            if matrix is None:
                raise FFSplitError(f"RowQuantizer: this FFN has no {name} projection")
            matrix = matrix.detach().to(torch.float32)
            gram = self.gram
            if gram is None:  # RTN; with kept columns, GPTQ on an identity Gram is RTN
                if self.kept is None:
                    q = quantize_groups(matrix, bits, self.group_size)
                    self._cache[key] = GPTQResult(
                        q, torch.empty(0, dtype=torch.long), matrix[:, :0]
                    )
                    return self._cache[key]
                gram = torch.eye(matrix.shape[1], dtype=torch.float64)
            self._cache[key] = gptq_keep_columns(
                matrix, bits, self.group_size, gram, self.kept, act_order=self.act_order
            )
        return self._cache[key]

    def part(self, name: str, neurons: Tensor, bits: int, bias: Tensor | None) -> LinearPart:
        """The part standing for ``neurons``' rows of ``name`` at ``bits`` (16: bf16 rows)."""
        matrix = self.matrices[name]
        assert matrix is not None
        index = neurons.to(matrix.device)
        if bits == DENSE_BITS:
            return DenseLinear(to_storage(matrix.index_select(0, index)), bias)
        whole = self._whole(name, bits)
        rows = take_rows(whole.quantized, index)
        if self.kept is None:
            return QuantizedLinear(rows, False, bias)
        kept_weight = to_storage(whole.kept_values.index_select(0, index)).to(matrix.dtype)
        return ColumnOutlierLinear(rows, whole.kept, kept_weight, bias)


Block = tuple[Tensor, Callable[[FFNWeights, Tensor], BlockParts]]


def plan_blocks(
    weights: FFNWeights,
    plan: NeuronPlan,
    group_size: int,
    stats: LayerStats | None = None,
    *,
    gptq: bool = True,
    act_order: bool = True,
    rows: RowQuantizer | None = None,
) -> list[Block]:
    """The (neurons, compressor) blocks of the plan, highest widths first, for build_split: up/gate
    rows by ``rows`` (default: GPTQ on the FFN input Gram, or RTN), down columns by GPTQ over
    neurons on the hidden Gram when ``gptq`` (else RTN); 16 = bf16.

    Dense vectors are rounded to bf16, the storage precision their bytes are counted at. With
    GPTQ the dense down columns absorb the quantized neurons' error (quant.gptq_neurons).
    """
    if gptq and (stats is None or stats.gram_hidden is None):
        raise FFSplitError("plan_blocks: GPTQ for down needs statistics with the hidden Gram")
    down_t = weights.down.detach().t().to(torch.float32)
    if gptq:
        gram_hidden = stats.gram_hidden.to(down_t.device)  # type: ignore[union-attr]
        columns = gptq_neurons(down_t, plan.down, group_size, gram_hidden, act_order=act_order)
    else:
        columns = rtn_neurons(down_t, plan.down, group_size)
    if rows is None:
        if gptq and (stats is None or stats.gram_in is None):
            raise FFSplitError("plan_blocks: GPTQ for up/gate needs statistics with the input Gram")
        gram_in = stats.gram_in if gptq else None  # type: ignore[union-attr]
        rows = RowQuantizer(weights, group_size, gram_in, act_order=act_order)

    def compressor(row_bits: int, down_bits: int) -> Callable[[FFNWeights, Tensor], BlockParts]:
        def compress(block: FFNWeights, neurons: Tensor) -> BlockParts:
            up = rows.part("up", neurons, row_bits, block.up_bias)
            gate = None
            if block.gate is not None:
                gate = rows.part("gate", neurons, row_bits, block.gate_bias)
            index = neurons.to(columns.values.device)
            if down_bits == DENSE_BITS:
                down = DenseLinear(columns.values[index].t().to(weights.down.dtype))
            else:
                down = QuantizedLinear(columns.quantized(index), True)
            return BlockParts(up, gate, down)

        return compress

    return [(n, compressor(r, c)) for n, r, c in plan.blocks()]


def build_plan_ffn(
    weights: FFNWeights,
    plan: NeuronPlan,
    group_size: int,
    stats: LayerStats | None = None,
    *,
    gptq: bool = True,
    act_order: bool = True,
    rows: RowQuantizer | None = None,
) -> tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection]:
    """Split projections of one FFN quantized by the plan (:func:`plan_blocks`)."""
    blocks = plan_blocks(
        weights, plan, group_size, stats, gptq=gptq, act_order=act_order, rows=rows
    )
    return build_split(weights, blocks)
