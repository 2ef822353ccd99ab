"""Group-wise asymmetric quantization of neuron vectors: round to nearest, and GPTQ.

Pure functions on tensors; they produce the stored form defined in ffsplit/split/qformat.py (one
neuron vector per row, groups of ``group_size`` along each row sharing a float16 scale and zero,
``value = code * scale + zero``).

Why a float zero (``zero = group min``) rather than an integer zero point: the integer form forces
exact 0 onto the grid, which shifts the grid off the group's range and costs up to a step at one end;
a float zero spans exactly ``[min, max]``, bounds every element's error by ``scale / 2`` and
dequantizes as one multiply-add. Storage is the same (one 16-bit number per group).

Scales and zeros are stored in float16, rounded outward (zero down, scale up) so the stored grid
still covers ``[min, max]``; codes are then computed against the stored values, so the ``scale / 2``
bound holds for what is actually kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import QuantizedTensor, _check_bits, _check_group, pack_bits

# |values| above this would make float16 scales/zeros overflow (float16 max is 65504).
_MAX_ABS = 2.0**15
# GPTQ damping tries, relative to the mean Hessian diagonal (GPTQ's default percdamp is 0.01).
_GPTQ_DAMP_GROWTH = (1.0, 10.0, 100.0, 1e3)


def _check_matrix(matrix: Tensor, where: str) -> None:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or not matrix.is_floating_point():
        raise FFSplitError(f"{where}: matrix must be a 2-D floating tensor, got {matrix!r}")
    if matrix.numel() == 0:
        raise FFSplitError(f"{where}: matrix {tuple(matrix.shape)} is empty")
    if not torch.isfinite(matrix).all():
        raise FFSplitError(f"{where}: matrix {tuple(matrix.shape)} holds NaN or Inf values")
    peak = matrix.abs().max().item()
    if peak > _MAX_ABS:
        raise FFSplitError(
            f"{where}: matrix holds |value| {peak:g} > {_MAX_ABS:g}, beyond float16 scales and zeros"
        )


def _round_fp16(value: Tensor, up: bool) -> Tensor:
    """Round to float16 towards +inf (``up``) or -inf, so the stored grid never shrinks."""
    half = value.to(torch.float16)
    wide = half.to(value.dtype)
    wrong = wide < value if up else wide > value
    target = torch.full_like(half, math.inf if up else -math.inf)
    return torch.where(wrong, torch.nextafter(half, target), half)


def _group_params(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float16 ``(scale, zero)`` whose grid ``zero + [0, 2^bits-1] * scale`` covers ``[low, high]``."""
    # float64 so the span and the step are not rounded down before the outward float16 rounding.
    low, high = low.to(torch.float64), high.to(torch.float64)
    zero = _round_fp16(low, up=False)
    span = (high - zero.to(torch.float64)).clamp_min(0)
    scale = _round_fp16(span / ((1 << bits) - 1), up=True)
    return scale, zero


def _encode(values: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Nearest codes (uint8) of ``values`` on the grid of the stored float16 ``scale`` and ``zero``."""
    scale_wide = scale.to(values.dtype)
    safe = torch.where(scale_wide > 0, scale_wide, torch.ones_like(scale_wide))
    codes = torch.round((values - zero.to(values.dtype)) / safe)
    return codes.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def quantize_groups(matrix: Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Round-to-nearest (RTN) group-wise asymmetric quantization along the rows of ``matrix``.

    Every element's error is at most half its group's (stored) scale.
    """
    where = "quantize_groups"
    _check_matrix(matrix, where)
    _check_bits(bits, where)
    rows, cols = matrix.shape
    _check_group(cols, group_size, where)
    grouped = matrix.detach().to(torch.float32).reshape(rows, cols // group_size, group_size)
    scale, zero = _group_params(grouped.amin(-1), grouped.amax(-1), bits)
    codes = _encode(grouped, scale[..., None], zero[..., None], bits)
    return QuantizedTensor(
        packed=pack_bits(codes.reshape(-1), bits),
        scales=scale,
        zeros=zero,
        bits=bits,
        group_size=group_size,
        shape=(rows, cols),
    )


def gptq_quantize(
    matrix: Tensor,
    bits: int,
    group_size: int,
    gram: Tensor,
    damp: float = 1e-2,
    block_size: int = 128,
) -> QuantizedTensor:
    """GPTQ (Frantar et al., arXiv 2210.17323): quantize column by column, pushing each column's
    error onto the columns not yet quantized through the inverse Hessian ``gram = sum x x^T``.

    The compensation runs along the input dimension of ``y = x @ matrix.T``, so ``matrix``'s
    columns must be the matmul's inputs: this fits up/gate rows ``[neurons, d]`` with the FFN input
    Gram ``[d, d]``. It does not fit down stored neuron-major (``W_down.T [neurons, d]``: its columns
    are the matmul's outputs), so down uses :func:`quantize_groups` (RTN).

    Each group's scale and zero are set from the error-updated weights when the group starts (no
    act-order). Inputs the calibration never excited (zero Gram diagonal) get no compensation.
    ``damp`` is relative to the mean Gram diagonal and grows tenfold (bounded) if Cholesky fails.
    """
    where = "gptq_quantize"
    _check_matrix(matrix, where)
    _check_bits(bits, where)
    rows, cols = matrix.shape
    _check_group(cols, group_size, where)
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (cols, cols):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise FFSplitError(
            f"{where}: gram must be [{cols}, {cols}] (the matrix's columns), got {shape}"
        )
    if not torch.isfinite(gram).all():
        raise FFSplitError(f"{where}: gram holds NaN or Inf values; recompute the layer statistics")
    if not isinstance(damp, int | float) or not math.isfinite(damp) or damp <= 0:
        raise FFSplitError(f"{where}: damp must be a finite number > 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise FFSplitError(f"{where}: block_size must be a positive int, got {block_size!r}")

    weight = matrix.detach().to(torch.float64).clone()
    hessian = gram.detach().to(device=weight.device, dtype=torch.float64)
    hessian = (hessian + hessian.T) / 2
    if bool((hessian.diagonal() < 0).any()):
        raise FFSplitError(
            f"{where}: gram has negative diagonal entries, so it is no sum of x x^T; "
            f"recompute the layer statistics"
        )
    dead = hessian.diagonal() == 0
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    hessian[dead, dead] = 1
    eye = torch.eye(cols, dtype=torch.float64, device=weight.device)
    mean_diag = hessian.diagonal().mean().item()
    for growth in _GPTQ_DAMP_GROWTH:
        used = damp * growth
        lower, info = torch.linalg.cholesky_ex(hessian + used * mean_diag * eye)
        if info.item() == 0:
            break
    else:
        raise FFSplitError(
            f"{where}: gram [{cols}, {cols}] is not positive semi-definite (Cholesky failed even "
            f"with damping {used:g}); recompute the layer statistics"
        )
    # Upper Cholesky factor of H^{-1}: row i holds the update weights for column i (GPTQ eq. 3-4).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)

    groups = cols // group_size
    scales = torch.empty(rows, groups, dtype=torch.float16, device=weight.device)
    zeros = torch.empty_like(scales)
    all_codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    # Blocks hold whole groups so that a group's parameters see all earlier updates.
    block = group_size * max(1, block_size // group_size)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        current = weight[:, start:stop].clone()
        errors = torch.zeros_like(current)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            group = column // group_size
            if column % group_size == 0:
                members = current[:, i : i + group_size]
                scale, zero = _group_params(members.amin(-1), members.amax(-1), bits)
                scales[:, group], zeros[:, group] = scale, zero
            scale, zero = scales[:, group], zeros[:, group]
            code = _encode(current[:, i], scale, zero, bits)
            all_codes[:, column] = code
            rounded = code.to(torch.float64) * scale.to(torch.float64) + zero.to(torch.float64)
            error = (current[:, i] - rounded) / hinv_block[i, i]
            current[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = error
        weight[:, stop:] -= errors @ hinv[start:stop, stop:]
    return QuantizedTensor(
        packed=pack_bits(all_codes.reshape(-1), bits),
        scales=scales,
        zeros=zeros,
        bits=bits,
        group_size=group_size,
        shape=(rows, cols),
    )


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approximation.detach().to(torch.float64)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
