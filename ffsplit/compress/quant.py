"""Group-wise asymmetric quantization of neuron vectors, dense bit packing, and GPTQ.

Pure functions on tensors. A matrix ``[rows, cols]`` holds one neuron vector per row (rows of
up/gate; for down, the caller passes ``W_down.T`` so its columns become rows). Groups of
``group_size`` consecutive entries along each row share a float16 scale and zero:
``value = code * scale + zero`` with ``code`` in ``0..2^bits - 1``.

Why a float zero (``zero = group min``) rather than an integer zero point: the integer form forces
exact 0 onto the grid, which shifts the grid off the group's range and costs up to a step at one end;
a float zero spans exactly ``[min, max]``, bounds every element's error by ``scale / 2`` and
dequantizes as one multiply-add. Storage is the same (one 16-bit number per group).

Scales and zeros are stored in float16, rounded outward (zero down, scale up) so the stored grid
still covers ``[min, max]``; codes are then computed against the stored values, so the ``scale / 2``
bound holds for what is actually kept.

Bit packing: codes are laid out row-major and written as one little-endian bit stream, code ``i``
occupying stream bits ``i*bits .. i*bits + bits - 1`` (least significant first) and stream bit ``p``
being bit ``p % 8`` of byte ``p // 8``. For 4 bits this is the usual "low nibble first". The stream
takes exactly ``ceil(rows * cols * bits / 8)`` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError

MIN_BITS = 2
MAX_BITS = 8
# |values| above this would make float16 scales/zeros overflow (float16 max is 65504).
_MAX_ABS = 2.0**15
# Codes packed per chunk: bounds the bit-stream temporaries (bits bytes per code) to a few MiB.
# A multiple of 8 so that every chunk starts on a byte boundary.
_PACK_CHUNK = 1 << 20
# GPTQ damping tries, relative to the mean Hessian diagonal (GPTQ's default percdamp is 0.01).
_GPTQ_DAMP_GROWTH = (1.0, 10.0, 100.0, 1e3)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A ``shape = (rows, cols)`` matrix quantized group-wise along its rows.

    ``packed`` uint8 ``[ceil(rows*cols*bits/8)]`` codes (see module doc for the layout);
    ``scales`` and ``zeros`` float16 ``[rows, cols // group_size]``.
    """

    packed: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        where = "QuantizedTensor"
        if len(self.shape) != 2 or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.shape
        ):
            raise FFSplitError(f"{where}: shape must be two positive ints, got {self.shape!r}")
        rows, cols = self.shape
        _check_bits(self.bits, where, low=1)
        _check_group(cols, self.group_size, where)
        groups = cols // self.group_size
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != (
            packed_size(rows * cols, self.bits),
        ):
            raise FFSplitError(
                f"{where}: packed must be uint8 [{packed_size(rows * cols, self.bits)}] for "
                f"shape {self.shape} at {self.bits} bits, got {self.packed.dtype} "
                f"{tuple(self.packed.shape)}"
            )
        for name, value in (("scales", self.scales), ("zeros", self.zeros)):
            if value.dtype != torch.float16 or tuple(value.shape) != (rows, groups):
                raise FFSplitError(
                    f"{where}: {name} must be float16 [{rows}, {groups}], got {value.dtype} "
                    f"{tuple(value.shape)}"
                )


def _check_bits(bits: int, where: str, low: int = MIN_BITS) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_BITS:
        raise FFSplitError(
            f"{where}: bits {bits!r} is not supported; use an int in {low}..{MAX_BITS}"
        )


def _check_group(cols: int, group_size: int, where: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FFSplitError(f"{where}: group_size must be a positive int, got {group_size!r}")
    if cols % group_size:
        raise FFSplitError(
            f"{where}: group_size {group_size} does not divide the {cols} columns; "
            f"use pick_group_size({cols}) = {pick_group_size(cols)}"
        )


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


def pick_group_size(cols: int, preferred: int = 128) -> int:
    """Largest of ``preferred, preferred/2, ...`` (down to 16) dividing ``cols``; else ``cols``.

    E.g. 576 (SmolLM2's hidden size) is not a multiple of 128, so it gets 64.
    """
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise FFSplitError(f"pick_group_size: cols must be a positive int, got {cols!r}")
    if isinstance(preferred, bool) or not isinstance(preferred, int) or preferred < 1:
        raise FFSplitError(f"pick_group_size: preferred must be a positive int, got {preferred!r}")
    size = preferred
    while size >= 16:
        if cols % size == 0:
            return size
        if size % 2:
            break
        size //= 2
    return cols


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed densely: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Exact storage of a quantized ``[rows, cols]`` matrix: packed codes + float16 scale and zero.

    Equals ``nbytes(quantize_groups(matrix, bits, group_size))``; budgets use it without tensors.
    """
    _check_bits(bits, "quantized_nbytes", low=1)
    _check_group(cols, group_size, "quantized_nbytes")
    return packed_size(rows * cols, bits) + 2 * 2 * rows * (cols // group_size)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (each < 2^bits) into the dense little-endian bit stream (module doc)."""
    _check_bits(bits, "pack_bits", low=1)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise FFSplitError(f"pack_bits: codes must be a 1-D uint8 tensor, got {codes!r}")
    if codes.numel() and int(codes.max().item()) >= 1 << bits:
        raise FFSplitError(
            f"pack_bits: code {int(codes.max().item())} does not fit in {bits} bits; "
            f"codes must be < {1 << bits}"
        )
    if bits == 8:
        return codes.clone()
    count = codes.numel()
    out = torch.empty(packed_size(count, bits), dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    for start in range(0, count, _PACK_CHUNK):
        part = codes[start : start + _PACK_CHUNK]
        size = packed_size(part.numel(), bits)
        stream = ((part[:, None] >> shifts[:bits]) & 1).reshape(-1)
        padded = torch.zeros(size * 8, dtype=torch.uint8, device=codes.device)
        padded[: stream.numel()] = stream
        padded = padded.view(size, 8)
        byte = torch.zeros(size, dtype=torch.uint8, device=codes.device)
        for k in range(8):
            byte |= padded[:, k] << k
        first = start * bits // 8
        out[first : first + size] = byte
    return out


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as a 1-D uint8 tensor."""
    _check_bits(bits, "unpack_bits", low=1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise FFSplitError(f"unpack_bits: count must be a non-negative int, got {count!r}")
    expected = packed_size(count, bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.shape != (expected,):
        raise FFSplitError(
            f"unpack_bits: packed must be uint8 [{expected}] for {count} codes at {bits} bits, "
            f"got {packed!r}"
        )
    if bits == 8:
        return packed.clone()
    out = torch.empty(count, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    for start in range(0, count, _PACK_CHUNK):
        size = min(_PACK_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first : first + packed_size(size, bits)]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)[: size * bits].view(size, bits)
        code = torch.zeros(size, dtype=torch.uint8, device=packed.device)
        for k in range(bits):
            code |= stream[:, k] << k
        out[start : start + size] = code
    return out


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


def codes(q: QuantizedTensor) -> Tensor:
    """The unpacked codes of ``q`` as uint8 ``[rows, cols]``."""
    rows, cols = q.shape
    return unpack_bits(q.packed, q.bits, rows * cols).view(rows, cols)


def dequantize(q: QuantizedTensor) -> Tensor:
    """float32 ``[rows, cols]`` reconstruction ``code * scale + zero``."""
    rows, cols = q.shape
    grouped = codes(q).view(rows, cols // q.group_size, q.group_size).to(torch.float32)
    values = grouped * q.scales.to(torch.float32)[..., None] + q.zeros.to(torch.float32)[..., None]
    return values.view(rows, cols)


def nbytes(q: QuantizedTensor) -> int:
    """Exact storage bytes of ``q``: packed codes + float16 scales + float16 zeros."""
    return (
        q.packed.numel() * q.packed.element_size()
        + q.scales.numel() * q.scales.element_size()
        + q.zeros.numel() * q.zeros.element_size()
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
