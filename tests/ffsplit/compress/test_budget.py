"""Byte accounting and budget solvers: exact numbers, targets met tightly, clear errors."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from ffsplit.compress.budget import (
    FFNShape,
    dense_ffn_bytes,
    lowrank_bytes,
    max_useful_rank,
    neuron_plan_bytes,
    prune_bytes,
    quant_bytes,
    reduction,
    solve_kept_neurons,
    solve_light_bits,
    solve_rank,
    solve_two_levels,
    vector_bytes,
)
from ffsplit.compress.quant import quantize_groups
from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import nbytes, quantized_nbytes

SMOLLM2 = FFNShape(d=576, m=1536, gated=True)  # SmolLM2-135M: SwiGLU, no biases
OPT = FFNShape(d=768, m=3072, gated=False, up_bias=True, down_bias=True)  # OPT-125m: fc1/fc2 biases
HEAVY_10 = math.ceil(0.1 * 1536)  # 154


def test_dense_bytes() -> None:
    assert dense_ffn_bytes(SMOLLM2) == 3 * 576 * 1536 * 2 == 5_308_416
    assert dense_ffn_bytes(OPT) == 2 * 768 * 3072 * 2 + (3072 + 768) * 2 == 9_444_864


def test_reduction_is_exact_and_validated() -> None:
    assert reduction(1000, 250) == 0.75
    assert reduction(3, 1) == (3 - 1) / 3
    for dense, compressed in [(0, 0), (10, -1), (10, 1.5)]:
        with pytest.raises(FFSplitError):
            reduction(dense, compressed)  # type: ignore[arg-type]


def test_shape_validation_and_from_weights() -> None:
    with pytest.raises(FFSplitError, match="d must be"):
        FFNShape(d=0, m=4, gated=False)
    with pytest.raises(FFSplitError, match="gate_bias"):
        FFNShape(d=4, m=4, gated=False, gate_bias=True)
    weights = SimpleNamespace(
        up=torch.zeros(12, 8),
        gate=None,
        down=torch.zeros(8, 12),
        up_bias=torch.zeros(12),
        gate_bias=None,
        down_bias=torch.zeros(8),
    )
    assert FFNShape.from_weights(weights) == FFNShape(8, 12, False, up_bias=True, down_bias=True)


def test_lowrank_bytes() -> None:
    light = 1536 - HEAVY_10
    expected = 2 * 3 * (HEAVY_10 * 576 + 100 * (light + 576))
    assert lowrank_bytes(SMOLLM2, HEAVY_10, 100) == expected
    # Rank 0 drops the light part, biases included: pruning to the heavy neurons.
    assert (
        lowrank_bytes(OPT, 308, 0) == prune_bytes(OPT, 308) == 2 * 2 * 308 * 768 + (308 + 768) * 2
    )
    assert lowrank_bytes(OPT, 308, 10) == 2 * 2 * (308 * 768 + 10 * (2764 + 768)) + (3072 + 768) * 2
    with pytest.raises(FFSplitError, match="rank 577"):
        lowrank_bytes(SMOLLM2, HEAVY_10, 577)
    with pytest.raises(FFSplitError, match="heavy"):
        lowrank_bytes(SMOLLM2, 1537, 1)


def test_max_useful_rank() -> None:
    light = 1536 - HEAVY_10
    cap = max_useful_rank(SMOLLM2, HEAVY_10)
    assert cap == 406  # 1382 * 576 / (1382 + 576) = 406.55
    assert cap * (light + 576) < light * 576 <= (cap + 1) * (light + 576)
    assert max_useful_rank(SMOLLM2, 1536) == 0


def test_solve_rank_golden_numbers() -> None:
    # SmolLM2, 10% heavy, halve the FFN: (2_654_208 - 532_224) / (3 * 2 * 1958) = 180.6
    assert solve_rank(SMOLLM2, HEAVY_10, 0.5) == 180
    # OPT-125m, 10% heavy, 40%: (5_666_918.4 - 946_176 - 7_680) / (2 * 2 * 3532) = 333.6
    assert solve_rank(OPT, 308, 0.4) == 333


@pytest.mark.parametrize("shape", [SMOLLM2, OPT])
@pytest.mark.parametrize("heavy_ratio", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.6, 0.75])
def test_solve_rank_meets_target_tightly(
    shape: FFNShape, heavy_ratio: float, target: float
) -> None:
    heavy = math.ceil(heavy_ratio * shape.m)
    dense = dense_ffn_bytes(shape)
    if reduction(dense, prune_bytes(shape, heavy)) < target:
        with pytest.raises(FFSplitError, match="heavy neurons alone"):
            solve_rank(shape, heavy, target)
        return
    rank = solve_rank(shape, heavy, target)
    assert reduction(dense, lowrank_bytes(shape, heavy, rank)) >= target
    assert rank < max_useful_rank(shape, heavy)
    assert reduction(dense, lowrank_bytes(shape, heavy, rank + 1)) < target


def test_solve_rank_impossible_budget() -> None:
    # 70% heavy neurons alone take 70% of the bytes: a 50% reduction is out of reach.
    with pytest.raises(FFSplitError, match=r"heavy neurons alone take 70\.05% of FFN bytes"):
        solve_rank(SMOLLM2, 1076, 0.5)
    # Exactly at the edge: 50% heavy dense meets 50% with the light part dropped.
    assert solve_rank(SMOLLM2, 768, 0.5) == 0
    with pytest.raises(FFSplitError, match="reduction"):
        solve_rank(SMOLLM2, HEAVY_10, 1.0)


def test_solve_rank_caps_and_reports() -> None:
    with pytest.warns(UserWarning, match="rank capped at 406"):
        assert solve_rank(SMOLLM2, HEAVY_10, 0.0) == 406


# Per neuron and matrix at d = 576, group 64: 72 * bits code bytes + 9 groups * 4 bytes.
PER_NEURON = {16: 1152, 8: 612, 4: 324, 3: 252, 2: 180}


def test_quant_bytes_accounting() -> None:
    counts = {4: 71, 3: 1311}
    expected = 3 * (HEAVY_10 * 1152 + 71 * 324 + 1311 * 252)
    assert quant_bytes(SMOLLM2, HEAVY_10, 16, counts, 64) == expected
    assert quant_bytes(SMOLLM2, 0, 16, {16: 1536}, 64) == dense_ffn_bytes(SMOLLM2)
    assert quant_bytes(SMOLLM2, HEAVY_10, 8, {2: 1382}, 64) == 3 * (154 * 612 + 1382 * 180)
    # Packing pads each tensor to a whole byte: 3 neurons * 24 values * 3 bits = 216 bits = 27 B.
    tiny = FFNShape(d=24, m=5, gated=False, up_bias=True, down_bias=True)
    assert quant_bytes(tiny, 2, 16, {3: 3}, 8) == 2 * (2 * 24 * 2 + 27 + 3 * 3 * 4) + (5 + 24) * 2


def test_quant_bytes_matches_real_quantized_tensors() -> None:
    shape = FFNShape(d=48, m=20, gated=True)
    generator = torch.Generator().manual_seed(0)
    up, gate = torch.randn(20, 48, generator=generator), torch.randn(20, 48, generator=generator)
    down = torch.randn(48, 20, generator=generator)
    heavy, counts = 4, {4: 7, 3: 9}
    total = 0
    for neuron_major in (up, gate, down.T):
        total += 2 * neuron_major[:heavy].numel()  # heavy rows dense at 16 bits
        total += nbytes(quantize_groups(neuron_major[heavy:11], 4, 16))
        total += nbytes(quantize_groups(neuron_major[11:], 3, 16))
    assert quant_bytes(shape, heavy, 16, counts, 16) == total


def test_quant_bytes_validation() -> None:
    with pytest.raises(FFSplitError, match="sums to 1000"):
        quant_bytes(SMOLLM2, HEAVY_10, 16, {4: 1000}, 64)
    with pytest.raises(FFSplitError, match="bit width 1"):
        quant_bytes(SMOLLM2, HEAVY_10, 16, {1: 1382}, 64)
    with pytest.raises(FFSplitError, match="group_size 128"):
        quant_bytes(SMOLLM2, HEAVY_10, 16, {4: 1382}, 128)
    with pytest.raises(FFSplitError, match="heavy_bits 12"):
        quant_bytes(SMOLLM2, HEAVY_10, 12, {4: 1382}, 64)


def test_solve_light_bits_golden_numbers() -> None:
    # 70% at 10% heavy: light budget 1_060_300.8 B / 3 matrices between 3 and 4 bits:
    # 72 * n4 <= 353_433.6 - 1382 * 252 -> n4 = 71.
    assert solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.7, 64) == {4: 71, 3: 1311}
    # Small budgets mix dense (16) and 8-bit light neurons.
    assert list(solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.2, 64)) == [16, 8]
    # With 8-bit heavy neurons the light ones never go above 8 bits.
    assert max(solve_light_bits(SMOLLM2, HEAVY_10, 8, 0.3, 64)) == 8
    # A whole level is returned alone: uniform 4-bit saves exactly 1 - 324/1152 = 0.71875.
    assert solve_light_bits(SMOLLM2, 0, 16, 0.71875, 64) == {4: 1536}
    assert solve_light_bits(SMOLLM2, 0, 16, 0.0, 64) == {16: 1536}


@pytest.mark.parametrize("shape", [SMOLLM2, OPT])
@pytest.mark.parametrize("heavy_ratio", [0.0, 0.1, 0.25])
@pytest.mark.parametrize("heavy_bits", [16, 8])
@pytest.mark.parametrize("target", [0.1, 0.45, 0.6, 0.7])
def test_solve_light_bits_meets_target_tightly(
    shape: FFNShape, heavy_ratio: float, heavy_bits: int, target: float
) -> None:
    heavy = math.ceil(heavy_ratio * shape.m)
    group = 64
    dense = dense_ffn_bytes(shape)
    try:
        counts = solve_light_bits(shape, heavy, heavy_bits, target, group)
    except FFSplitError:
        # Only when even all light neurons at 2 bits miss the target.
        floor = quant_bytes(shape, heavy, heavy_bits, {2: shape.m - heavy}, group)
        assert reduction(dense, floor) < target
        return
    assert sum(counts.values()) == shape.m - heavy
    assert all(count > 0 for count in counts.values())
    assert reduction(dense, quant_bytes(shape, heavy, heavy_bits, counts, group)) >= target
    ladder = [heavy_bits] + [b for b in (8, 4, 3, 2) if b < heavy_bits]
    bits = sorted(counts, reverse=True)
    assert list(counts) == bits  # higher level first
    assert len(bits) == 1 or ladder.index(bits[1]) == ladder.index(bits[0]) + 1  # adjacent
    # Tight: moving one more neuron up a level (or, if one level, the whole part up) misses.
    top = ladder.index(bits[0])
    if len(bits) == 2:
        higher = {bits[0]: counts[bits[0]] + 1, bits[1]: counts[bits[1]] - 1}
        higher = {b: n for b, n in higher.items() if n}
    elif top > 0:
        higher = {ladder[top - 1]: 1, bits[0]: counts[bits[0]] - 1}
    else:
        return
    assert reduction(dense, quant_bytes(shape, heavy, heavy_bits, higher, group)) < target


def test_solve_light_bits_impossible_and_invalid() -> None:
    with pytest.raises(FFSplitError, match=r"budget 0\.8 cannot be met with heavy ratio 0\.651"):
        solve_light_bits(SMOLLM2, 1000, 16, 0.8, 64)
    with pytest.raises(FFSplitError, match="ladder"):
        solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.5, 64, ladder=(4, 1))
    with pytest.raises(FFSplitError, match="repeats"):
        solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.5, 64, ladder=(4, 4))
    # A narrower ladder reaches less: 4 bits floor at 10% heavy is 1 - (1152*154 + 324*1382)/(1152*1536).
    with pytest.raises(FFSplitError, match="ladder"):
        solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.7, 64, ladder=(8, 4))


def test_prune_golden_numbers_and_tightness() -> None:
    assert prune_bytes(SMOLLM2, 768) == dense_ffn_bytes(SMOLLM2) // 2
    assert solve_kept_neurons(SMOLLM2, 0.5) == 768
    # OPT: 3074 bytes per kept neuron + 1536 for the down bias; (4_722_432 - 1536) / 3074 = 1535.8
    assert solve_kept_neurons(OPT, 0.5) == 1535
    for shape in (SMOLLM2, OPT):
        dense = dense_ffn_bytes(shape)
        for target in (0.1, 0.33, 0.9, 0.999):
            kept = solve_kept_neurons(shape, target)
            assert reduction(dense, prune_bytes(shape, kept)) >= target
            assert kept == shape.m or reduction(dense, prune_bytes(shape, kept + 1)) < target
    assert solve_kept_neurons(SMOLLM2, 0.0) == 1536


def test_prune_impossible_budget() -> None:
    # OPT's down bias (1536 B) stays even with every neuron pruned.
    with pytest.raises(FFSplitError, match="down bias"):
        solve_kept_neurons(OPT, 0.99999)


def test_solvers_are_silent_when_not_capped() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_rank(OPT, 308, 0.4)
        solve_light_bits(OPT, 308, 16, 0.6, 128)


# ------------------------------------------------------------ per-neuron widths (issue 17)


def test_vector_bytes_are_exact_and_additive() -> None:
    assert vector_bytes(576, 16, 64) == 1152
    assert vector_bytes(576, 4, 64) == 576 * 4 // 8 + 9 * 4 == quantized_nbytes(1, 576, 4, 64)
    for bits in (2, 3, 5, 6, 8):
        assert 7 * vector_bytes(576, bits, 64) == quantized_nbytes(7, 576, bits, 64)
    with pytest.raises(FFSplitError, match="multiple of 8"):
        vector_bytes(100, 4, 50)
    with pytest.raises(FFSplitError, match="divide"):
        vector_bytes(576, 4, 128)


def test_neuron_plan_bytes_matches_quant_bytes_for_a_two_level_plan() -> None:
    counts = solve_light_bits(SMOLLM2, HEAVY_10, 16, 0.7, 64)
    widths = [16] * HEAVY_10 + [b for b, n in counts.items() for _ in range(n)]
    planned = neuron_plan_bytes(SMOLLM2, widths, widths, 64)
    assert planned == quant_bytes(SMOLLM2, HEAVY_10, 16, counts, 64)
    # down at other widths than up/gate: blocks per pair, bytes still exact
    down = [8] * HEAVY_10 + widths[HEAVY_10:]
    dense_down = 576 * 2 * HEAVY_10
    assert neuron_plan_bytes(SMOLLM2, widths, down, 64) == planned - dense_down + HEAVY_10 * (
        vector_bytes(576, 8, 64)
    )
    with pytest.raises(FFSplitError, match="1536 widths"):
        neuron_plan_bytes(SMOLLM2, widths[:-1], down, 64)


def test_solve_two_levels_takes_the_most_bytes_that_fit() -> None:
    def nbytes(high: int, low: int, count: int) -> int:
        return count * high + (10 - count) * low

    assert solve_two_levels((8, 4, 2), 10, nbytes, lambda b: b <= 100) == (8, 8, 10)
    assert solve_two_levels((8, 4, 2), 10, nbytes, lambda b: b <= 50) == (8, 4, 2)
    assert solve_two_levels((8, 4, 2), 10, nbytes, lambda b: b <= 30) == (4, 2, 5)
    with pytest.raises(FFSplitError, match="no mix"):
        solve_two_levels((8, 4, 2), 10, nbytes, lambda b: b <= 19)
