"""Group-wise quantization: bit packing, error bounds, SQNR floors, exact bytes and GPTQ."""

from __future__ import annotations

import math

import pytest
import torch

from ffsplit.compress.quant import gptq_quantize, quantize_groups, sqnr_db
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
