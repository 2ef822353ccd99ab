"""Column-outlier baseline: kept columns exact, bytes exact, the same budget as every method."""

from __future__ import annotations

import math

import torch

from ffsplit.compress.budget import FFNShape, dense_ffn_bytes, reduction
from ffsplit.compress.outliers import (
    ColumnOutlierLinear,
    kept_column_bytes,
    outlier_columns,
    outlier_count,
)
from ffsplit.compress.plans import RowQuantizer, build_plan_ffn, column_outlier_plan
from ffsplit.compress.quant import gptq_keep_columns, quantize_groups
from ffsplit.split.qformat import dequantize, quantized_nbytes
from tests.ffsplit.compress.test_allocation import GROUP, M, dense_output, ffn_output, gated_ffn


def test_outlier_columns_are_the_highest_energy_inputs() -> None:
    gram = torch.diag(torch.tensor([1.0, 9.0, 3.0, 9.0, 0.5]))
    assert outlier_columns(gram, 3).tolist() == [1, 3, 2]
    assert outlier_count(576, 0.01) == 6 and outlier_count(1536, 0.01) == 16


def test_column_outlier_part_reconstructs_kept_columns_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 64, generator=g)
    kept = torch.tensor([5, 33])
    weight[:, kept] *= 40
    q = quantize_groups(weight, 3, 16)
    kept_weight = weight[:, kept].to(torch.bfloat16).float()
    part = ColumnOutlierLinear(q, kept, kept_weight)
    restored = part.dense_weight()
    assert torch.equal(restored[:, kept], kept_weight)
    others = torch.ones(64, dtype=torch.bool)
    others[kept] = False
    assert torch.equal(restored[:, others], dequantize(q)[:, others])
    x = torch.randn(3, 64, generator=g)
    assert torch.allclose(part(x), x @ restored.T, atol=1e-5)
    assert part.nbytes() == quantized_nbytes(12, 64, 3, 16) + 2 * (12 * 2 + 2)
    assert kept_column_bytes(12, 2) == 2 * (12 * 2 + 2)


def test_gptq_kept_columns_in_a_part_are_the_compensated_values() -> None:
    weights, stats, _ = gated_ffn()
    kept = outlier_columns(stats.gram_in, 4)
    rows = RowQuantizer(weights, GROUP, stats.gram_in, kept=kept)
    part = rows.part("up", torch.arange(M), 3, None)
    direct = gptq_keep_columns(weights.up.float(), 3, GROUP, stats.gram_in, kept, act_order=True)
    assert torch.equal(part.dense_weight()[:, kept], direct.kept_values.to(torch.bfloat16).float())


def test_column_outlier_plan_meets_the_budget_and_builds_to_its_bytes() -> None:
    weights, stats, x = gated_ffn(seed=1)
    shape = FFNShape.from_weights(weights)
    ratio = 0.05
    kept_in = outlier_count(shape.d, ratio)
    kept_down = outlier_columns(stats.gram_hidden, outlier_count(shape.m, ratio))
    plan = column_outlier_plan(shape, kept_down, kept_in, 0.6, GROUP, (8, 6, 5, 4, 3, 2))
    assert set(plan.down[kept_down].tolist()) == {16}
    rows = RowQuantizer(weights, GROUP, stats.gram_in, kept=outlier_columns(stats.gram_in, kept_in))
    modules = build_plan_ffn(weights, plan, GROUP, stats, rows=rows)
    built = sum(mod.nbytes() for mod in modules if mod is not None)
    dense = dense_ffn_bytes(shape)
    assert reduction(dense, built) >= 0.6
    # one more neuron at the higher width would miss the target
    assert built > math.floor(0.4 * dense) - 3 * 2 * shape.d
    out = ffn_output(modules, x)
    reference = dense_output(weights, x)
    assert float((out - reference).pow(2).sum() / reference.pow(2).sum()) < 0.05
