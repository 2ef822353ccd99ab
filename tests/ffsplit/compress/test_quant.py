"""Group-wise quantization: bit packing, error bounds, SQNR floors, exact bytes and GPTQ."""

from __future__ import annotations

import math

import pytest
import torch

from ffsplit.compress.quant import (
    gptq_keep_columns,
    gptq_neurons,
    gptq_quantize,
    quantize_groups,
    rtn_neurons,
    sqnr_db,
    take_rows,
)
from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import (
    QuantizedTensor,
    codes,
    dequantize,
    nbytes,
    quantized_nbytes,
)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_layout_and_exact_bytes(bits: int) -> None:
    matrix = gaussian(12, 96)
    q = quantize_groups(matrix, bits, 32)
    assert q.shape == (12, 96) and q.bits == bits and q.group_size == 32
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(12 * 96 * bits / 8)
    assert q.scales.dtype == q.zeros.dtype == torch.float16
    assert q.scales.shape == q.zeros.shape == (12, 3)
    assert nbytes(q) == math.ceil(12 * 96 * bits / 8) + 2 * 2 * 12 * 3
    assert nbytes(q) == quantized_nbytes(12, 96, bits, 32)
    assert int(codes(q).max()) < 1 << bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_error_is_at_most_half_a_step(bits: int) -> None:
    matrix = gaussian(16, 128, seed=bits)
    q = quantize_groups(matrix, bits, 32)
    error = (dequantize(q) - matrix).abs().view(16, 4, 32)
    half_step = q.scales.float()[..., None] / 2
    # Float32 dequantization adds a few ulps of the value on top of the half step.
    assert bool((error <= half_step * (1 + 1e-5) + 1e-7).all())


def test_sqnr_floors_on_gaussian_weights() -> None:
    matrix = gaussian(64, 512, seed=3)
    ratios = {
        bits: sqnr_db(matrix, dequantize(quantize_groups(matrix, bits, 128)))
        for bits in (2, 3, 4, 8)
    }
    assert ratios[8] > 40 and ratios[4] > 18 and ratios[3] > 12 and ratios[2] > 5
    assert ratios[2] < ratios[3] < ratios[4] < ratios[8]


def test_constant_and_extreme_groups() -> None:
    matrix = torch.zeros(2, 32)
    matrix[0] = 0.5  # constant and exactly representable: reconstructed exactly
    matrix[1, 0], matrix[1, 1] = -3.0, 5.0  # the range's ends, up to float16 rounding of the step
    q = quantize_groups(matrix, 4, 16)
    restored = dequantize(q)
    assert torch.equal(restored[0], matrix[0])
    assert restored[1, 0].item() == -3.0 and restored[1, 1].item() == pytest.approx(
        5.0, abs=15 * 2**-11
    )


def test_quantize_validation() -> None:
    matrix = gaussian(4, 64)
    for bits in (1, 9, 4.0):
        with pytest.raises(FFSplitError, match="bits"):
            quantize_groups(matrix, bits, 16)  # type: ignore[arg-type]
    with pytest.raises(FFSplitError, match="does not divide the 64 columns"):
        quantize_groups(matrix, 4, 48)
    with pytest.raises(FFSplitError, match="NaN"):
        quantize_groups(torch.full((2, 16), float("nan")), 4, 16)
    with pytest.raises(FFSplitError, match="float16"):
        quantize_groups(torch.full((2, 16), 1e6), 4, 16)


def correlated_inputs(tokens: int, features: int, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / math.sqrt(features)
    scale = torch.logspace(0.5, -1.5, features)
    return (torch.randn(tokens, features, generator=generator) * scale) @ mixing + 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_has_lower_output_error_than_rtn(bits: int) -> None:
    inputs = correlated_inputs(tokens=2048, features=64)
    matrix = gaussian(48, 64, seed=7)
    gram = inputs.double().T @ inputs.double()

    def output_error(q: QuantizedTensor) -> float:
        return (inputs.double() @ (matrix.double() - dequantize(q).double()).T).pow(2).sum().item()

    rtn = output_error(quantize_groups(matrix, bits, 16))
    gptq = output_error(gptq_quantize(matrix, bits, 16, gram))
    assert gptq < 0.9 * rtn


def test_gptq_output_is_a_valid_deterministic_quantized_tensor() -> None:
    inputs = correlated_inputs(tokens=256, features=64)
    gram = inputs.double().T @ inputs.double()
    gram[5, :] = gram[:, 5] = 0  # an input the calibration never excited
    matrix = gaussian(8, 64)
    first = gptq_quantize(matrix, 4, 32, gram, block_size=48)  # rounds to whole groups
    second = gptq_quantize(matrix, 4, 32, gram)
    assert nbytes(first) == quantized_nbytes(8, 64, 4, 32)
    assert torch.equal(first.packed, second.packed) and torch.equal(first.scales, second.scales)
    assert sqnr_db(matrix, dequantize(first)) > 10


def test_gptq_validation() -> None:
    matrix = gaussian(4, 32)
    with pytest.raises(FFSplitError, match=r"\[32, 32\]"):
        gptq_quantize(matrix, 4, 16, torch.eye(16))
    with pytest.raises(FFSplitError, match="negative diagonal"):
        gptq_quantize(matrix, 4, 16, -torch.eye(32))
    with pytest.raises(FFSplitError, match="damp"):
        gptq_quantize(matrix, 4, 16, torch.eye(32), damp=0.0)
    with pytest.raises(FFSplitError, match="bits"):
        gptq_quantize(matrix, 1, 16, torch.eye(32))


def test_sqnr_db() -> None:
    reference = torch.ones(10)
    assert sqnr_db(reference, reference) == math.inf
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0)


# --------------------------------------------------------------------- act-order, kept columns


def heavy_tailed_inputs(tokens: int, features: int, seed: int = 11) -> torch.Tensor:
    """Correlated inputs whose energy differs by orders of magnitude across features (outlier
    channels), the case act-order exists for."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(features) + 0.3 * torch.randn(features, features, generator=generator)
    scale = torch.logspace(1.5, -1.5, features)[torch.randperm(features, generator=generator)]
    return (torch.randn(tokens, features, generator=generator) @ mixing) * scale


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_lowers_output_error(bits: int) -> None:
    inputs = heavy_tailed_inputs(tokens=2048, features=64).double()
    gram = inputs.T @ inputs
    errors = {}
    for act_order in (False, True):
        total = 0.0
        for seed in range(4):
            matrix = gaussian(32, 64, seed=seed)
            q = gptq_quantize(matrix, bits, 16, gram, act_order=act_order)
            total += (inputs @ (matrix.double() - dequantize(q).double()).T).pow(2).sum().item()
        errors[act_order] = total
    assert errors[True] < 0.95 * errors[False]


def test_gptq_without_act_order_is_unchanged_by_the_refactor() -> None:
    """Index order, one group per block start: the group parameters come from the updated block."""
    inputs = correlated_inputs(tokens=512, features=64)
    gram = inputs.double().T @ inputs.double()
    matrix = gaussian(8, 64, seed=2)
    q = gptq_quantize(matrix, 4, 16, gram)
    again = gptq_quantize(matrix, 4, 16, gram, block_size=16)  # blocks of one group
    assert torch.equal(q.packed, again.packed) and torch.equal(q.scales, again.scales)


def test_gptq_keep_columns_absorb_error_and_stay_out_of_ranges() -> None:
    inputs = heavy_tailed_inputs(tokens=2048, features=64).double()
    gram = inputs.T @ inputs
    matrix = gaussian(16, 64, seed=4)
    kept = torch.tensor([3, 40, 41])
    matrix[:, kept] *= 50  # outlier columns: would blow up their groups' ranges if included
    result = gptq_keep_columns(matrix, 3, 16, gram, kept, act_order=True)
    effective = dequantize(result.quantized).double()
    effective[:, kept] = result.kept_values.double()
    plain = dequantize(gptq_quantize(matrix, 3, 16, gram, act_order=True)).double()

    def output_error(weight: torch.Tensor) -> float:
        return (inputs @ (matrix.double() - weight).T).pow(2).sum().item()

    assert output_error(effective) < 0.5 * output_error(plain)
    # group ranges exclude the kept columns: the outliers' groups have normal steps
    assert float(result.quantized.scales.max()) < 0.2


def test_rtn_kept_column_values_are_the_original_when_no_compensation() -> None:
    """With an identity Gram, GPTQ pushes no error across columns: kept columns stay exact."""
    matrix = gaussian(8, 32, seed=6)
    kept = torch.tensor([0, 17])
    result = gptq_keep_columns(matrix, 4, 16, torch.eye(32) * 10, kept)
    assert torch.equal(result.kept_values, matrix[:, kept])


def neuron_inputs(tokens: int, neurons: int, seed: int = 3) -> torch.Tensor:
    """Hidden activations: a few neurons fire hard (heavy hitters), the rest are correlated."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, neurons, generator=generator)
    mixing = torch.eye(neurons) + 0.4 * torch.randn(neurons, neurons, generator=generator)
    hidden = base @ mixing
    hidden[:, :4] *= 20
    return hidden


def test_gptq_neurons_beats_rtn_and_float_neurons_absorb_error() -> None:
    hidden = neuron_inputs(4096, 48).double()
    gram = hidden.T @ hidden
    down_t = gaussian(48, 64, seed=9)  # W_down.T: neuron-major

    def output_error(values: torch.Tensor) -> float:
        return (hidden @ (down_t.double() - values.double())).pow(2).sum().item()

    bits = torch.full((48,), 3)
    rtn = output_error(rtn_neurons(down_t, bits, 16).values)
    gptq = output_error(gptq_neurons(down_t, bits, 16, gram).values)
    assert gptq < 0.8 * rtn
    with_float = bits.clone()
    with_float[:4] = 16
    floated = output_error(gptq_neurons(down_t, with_float, 16, gram).values)
    rtn_floated = output_error(rtn_neurons(down_t, with_float, 16).values)
    assert floated < 0.8 * rtn_floated and floated < gptq


def test_gptq_neurons_stored_rows_match_values() -> None:
    hidden = neuron_inputs(512, 24).double()
    down_t = gaussian(24, 32, seed=1)
    bits = torch.tensor([16] * 3 + [8] * 5 + [4] * 10 + [3] * 6)
    result = gptq_neurons(down_t, bits, 16, hidden.T @ hidden)
    for width in (8, 4, 3):
        rows = torch.nonzero(bits == width).flatten()
        q = result.quantized(rows)
        assert q.bits == width and nbytes(q) == quantized_nbytes(rows.numel(), 32, width, 16)
        assert torch.equal(dequantize(q), result.values[rows])
    floats = result.values[:3]
    assert torch.equal(floats, floats.to(torch.bfloat16).float())
    with pytest.raises(FFSplitError, match="share one bit width"):
        result.quantized(torch.tensor([0, 5]))
    with pytest.raises(FFSplitError, match="widths in 2..8"):
        gptq_neurons(down_t, torch.full((24,), 9), 16, hidden.T @ hidden)


def test_gptq_rows_are_independent_so_blocks_are_slices() -> None:
    inputs = heavy_tailed_inputs(tokens=512, features=64).double()
    gram = inputs.T @ inputs
    matrix = gaussian(20, 64, seed=8)
    rows = torch.tensor([17, 2, 5, 11])
    whole = take_rows(gptq_quantize(matrix, 3, 16, gram, act_order=True), rows)
    alone = gptq_quantize(matrix[rows], 3, 16, gram, act_order=True)
    assert torch.equal(whole.packed, alone.packed) and torch.equal(whole.scales, alone.scales)
    assert torch.equal(dequantize(whole), dequantize(alone))
