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
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import (
    QuantizedTensor,
    _check_bits,
    _check_group,
    dequantize,
    pack_bits,
)
from ffsplit.split.qformat import codes as unpack_codes

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


def _check_gram(gram: Tensor, cols: int, damp: float, where: str) -> None:
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (cols, cols):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise FFSplitError(
            f"{where}: gram must be [{cols}, {cols}] (the matrix's inputs), got {shape}"
        )
    if not torch.isfinite(gram).all():
        raise FFSplitError(f"{where}: gram holds NaN or Inf values; recompute the layer statistics")
    if not isinstance(damp, int | float) or not math.isfinite(damp) or damp <= 0:
        raise FFSplitError(f"{where}: damp must be a finite number > 0, got {damp!r}")


def _inverse_hessian_factor(
    gram: Tensor, cols: int, damp: float, device: torch.device, where: str
) -> Tensor:
    """Upper Cholesky factor of the damped ``H^{-1}`` (GPTQ eq. 3-4): row i holds the update
    weights for column i. Inputs the calibration never excited (zero diagonal) are decoupled."""
    hessian = gram.detach().to(device=device, dtype=torch.float64)
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
    eye = torch.eye(cols, dtype=torch.float64, device=device)
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
    # H^{-1} = L^{-T} L^{-1} by one triangular solve: torch.cholesky_inverse is ~40x slower on CPU.
    lower_inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
    return torch.linalg.cholesky(lower_inverse.T @ lower_inverse, upper=True)


def _check_block(block_size: int, where: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise FFSplitError(f"{where}: block_size must be a positive int, got {block_size!r}")


def _column_order(gram: Tensor, act_order: bool, last: Tensor) -> Tensor:
    """GPTQ's processing order: index order, or by descending Gram diagonal (act-order, GPTQ
    section 4 / AutoGPTQ ``desc_act``); columns in ``last`` go at the end, in their given order."""
    cols = gram.shape[0]
    if act_order:
        order = torch.sort(-gram.diagonal().to(torch.float64), stable=True).indices
    else:
        order = torch.arange(cols)
    order = order.to(last.device)
    if last.numel():
        order = torch.cat([order[~torch.isin(order, last)], last])
    return order


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ of a row-grouped matrix: the quantized matrix and the float columns kept out of it.

    ``kept_values [rows, k]`` are the final values of the ``kept`` input columns: they were
    quantized last (not at all), so they absorb the error of every other column (OWQ, arXiv
    2306.02272). Their codes in ``quantized`` are placeholders that a user must override.
    """

    quantized: QuantizedTensor
    kept: Tensor
    kept_values: Tensor


def gptq_quantize(
    matrix: Tensor,
    bits: int,
    group_size: int,
    gram: Tensor,
    damp: float = 1e-2,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedTensor:
    """GPTQ (Frantar et al., arXiv 2210.17323): quantize column by column, pushing each column's
    error onto the columns not yet quantized through the inverse Hessian ``gram = sum x x^T``.

    The compensation runs along the input dimension of ``y = x @ matrix.T``, so ``matrix``'s
    columns must be the matmul's inputs: this fits up/gate rows ``[neurons, d]`` with the FFN input
    Gram ``[d, d]``. Down stored neuron-major has its inputs on the rows: see
    :func:`gptq_neurons`.

    ``act_order`` processes columns by descending Gram diagonal. The stored format keeps groups
    contiguous along each row, so a group's scale and zero are set from the error-updated weights
    of all its members when the first of them is reached (no ``g_idx`` needed). Inputs the
    calibration never excited (zero Gram diagonal) get no compensation. ``damp`` is relative to
    the mean Gram diagonal and grows tenfold (bounded) if Cholesky fails.
    """
    result = gptq_keep_columns(
        matrix, bits, group_size, gram, None, damp=damp, block_size=block_size, act_order=act_order
    )
    return result.quantized


def gptq_keep_columns(
    matrix: Tensor,
    bits: int,
    group_size: int,
    gram: Tensor,
    kept: Tensor | None,
    *,
    damp: float = 1e-2,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQResult:
    """:func:`gptq_quantize` with some input columns kept in float (OWQ-style outlier columns):
    they go last, take every update and stay out of their groups' ranges."""
    where = "gptq_quantize"
    _check_matrix(matrix, where)
    _check_bits(bits, where)
    rows, cols = matrix.shape
    _check_group(cols, group_size, where)
    _check_block(block_size, where)
    device = matrix.device
    keep = torch.empty(0, dtype=torch.long) if kept is None else kept.to(torch.long).cpu()
    if keep.numel() and (
        keep.min() < 0 or keep.max() >= cols or keep.unique().numel() != keep.numel()
    ):
        raise FFSplitError(f"{where}: kept columns must be distinct indices in 0..{cols - 1}")
    _check_gram(gram, cols, damp, where)
    order = _column_order(gram.detach().cpu(), act_order, keep)
    hinv = _inverse_hessian_factor(gram.detach().cpu()[order][:, order], cols, damp, device, where)
    order = order.to(device)
    weight = matrix.detach().to(torch.float64)[:, order].clone()
    is_kept = torch.zeros(cols, dtype=torch.bool, device=device)
    is_kept[keep.to(device)] = True
    state = _RowGroups(rows, cols, group_size, bits, order, is_kept[order], device)
    block = group_size * max(1, block_size // group_size)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        errors = _gptq_row_block(weight, hinv, start, stop, state)
        weight[:, stop:] -= errors @ hinv[start:stop, stop:]
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    codes[:, order] = state.codes
    quantized = QuantizedTensor(
        packed=pack_bits(codes.reshape(-1), bits),
        scales=state.scales,
        zeros=state.zeros,
        bits=bits,
        group_size=group_size,
        shape=(rows, cols),
    )
    final = torch.empty_like(weight)
    final[:, order] = weight
    kept_device = keep.to(device)
    return GPTQResult(quantized, kept_device, final[:, kept_device].to(torch.float32))


class _RowGroups:
    """Per-group scales and zeros of a row-grouped GPTQ run, set when a group is first reached."""

    def __init__(
        self,
        rows: int,
        cols: int,
        group_size: int,
        bits: int,
        order: Tensor,
        kept_in_order: Tensor,
        device: torch.device,
    ) -> None:
        groups = cols // group_size
        self.bits = bits
        self.group_of = (order // group_size).tolist()  # group of each processing position
        position = torch.empty_like(order)
        position[order] = torch.arange(cols, device=order.device)
        # members[g]: processing positions of group g's quantized (not kept) columns
        kept_orig = torch.zeros(cols, dtype=torch.bool, device=order.device)
        kept_orig[order[kept_in_order]] = True
        self.members = [
            position[g * group_size : (g + 1) * group_size][
                ~kept_orig[g * group_size : (g + 1) * group_size]
            ]
            for g in range(groups)
        ]
        self.kept = kept_in_order.tolist()
        self.ready = [False] * groups
        self.scales = torch.zeros(rows, groups, dtype=torch.float16, device=device)
        self.zeros = torch.zeros_like(self.scales)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)


def _gptq_row_block(
    weight: Tensor, hinv: Tensor, start: int, stop: int, state: _RowGroups
) -> Tensor:
    """One GPTQ block (positions start..stop of the processing order); returns its scaled errors."""
    current = weight[:, start:stop].clone()
    errors = torch.zeros_like(current)
    hinv_block = hinv[start:stop, start:stop]
    for i in range(stop - start):
        position = start + i
        group = state.group_of[position]
        if not state.ready[group]:
            members = state.members[group]
            inside = members[members < stop] - start
            outside = members[members >= stop]
            # Members after this block still lack this block's updates: apply them on the fly.
            later = weight[:, outside] - errors[:, :i] @ hinv[start : start + i, outside]
            values = torch.cat([current[:, inside], later], dim=1)
            if values.shape[1] == 0:  # every column of the group is kept in float
                values = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            scale, zero = _group_params(values.amin(-1), values.amax(-1), state.bits)
            state.scales[:, group], state.zeros[:, group] = scale, zero
            state.ready[group] = True
        scale, zero = state.scales[:, group], state.zeros[:, group]
        code = _encode(current[:, i], scale, zero, state.bits)
        state.codes[:, position] = code
        if state.kept[position]:
            continue  # kept in float: no rounding, no error to push on
        rounded = code.to(torch.float64) * scale.to(torch.float64) + zero.to(torch.float64)
        error = (current[:, i] - rounded) / hinv_block[i, i]
        current[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
        errors[:, i] = error
    weight[:, start:stop] = current
    return errors


def take_rows(q: QuantizedTensor, rows: Tensor) -> QuantizedTensor:
    """The quantized matrix of some rows of ``q`` (codes, scales and zeros sliced, repacked).

    GPTQ treats rows independently (one Gram, one column order), so a block of rows quantized
    alone equals the same rows of the whole matrix quantized at once: blocks can share one run.
    """
    index = rows.to(q.packed.device, torch.long)
    return QuantizedTensor(
        packed=pack_bits(unpack_codes(q)[index].reshape(-1), q.bits),
        scales=q.scales[index].contiguous(),
        zeros=q.zeros[index].contiguous(),
        bits=q.bits,
        group_size=q.group_size,
        shape=(int(index.numel()), q.shape[1]),
    )


FLOAT_LEVEL = 16  # a neuron "quantized" at 16 bits is kept as a 16-bit float (bf16) vector


@dataclass(frozen=True)
class NeuronQuantization:
    """Neuron vectors ``[m, d]`` quantized one by one at per-neuron bit widths (16: kept float).

    ``values`` is the reconstruction (dequantized codes, or the bf16 float vector);
    ``codes``/``scales``/``zeros`` hold the stored form of the quantized rows.
    """

    values: Tensor
    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: Tensor
    group_size: int

    def quantized(self, rows: Tensor) -> QuantizedTensor:
        """The stored form of some rows, all at one bit width below 16."""
        rows = rows.to(self.bits.device)
        widths = self.bits[rows].unique()
        if widths.numel() != 1 or int(widths) == FLOAT_LEVEL:
            raise FFSplitError(
                f"NeuronQuantization.quantized: rows must share one bit width below "
                f"{FLOAT_LEVEL}, got {widths.tolist()}"
            )
        bits = int(widths)
        return QuantizedTensor(
            packed=pack_bits(self.codes[rows].reshape(-1), bits),
            scales=self.scales[rows].contiguous(),
            zeros=self.zeros[rows].contiguous(),
            bits=bits,
            group_size=self.group_size,
            shape=(int(rows.numel()), int(self.codes.shape[1])),
        )


def _check_neuron_bits(bits: Tensor, rows: int, where: str) -> Tensor:
    bits = torch.as_tensor(bits).to(torch.long).cpu()
    allowed = (bits == FLOAT_LEVEL) | ((bits >= 2) & (bits <= 8))
    if bits.shape != (rows,) or not bool(allowed.all()):
        raise FFSplitError(
            f"{where}: bits must be [{rows}] widths in 2..8 or {FLOAT_LEVEL} (float), "
            f"got shape {tuple(bits.shape)}"
        )
    return bits


def _round_row(
    values: Tensor, bits: int, group_size: int
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(rounded, codes, scale, zero) of one neuron vector; a float row is rounded to bf16."""
    if bits == FLOAT_LEVEL:
        return values.to(torch.bfloat16).to(values.dtype), None, None, None
    grouped = values.reshape(-1, group_size)
    scale, zero = _group_params(grouped.amin(-1), grouped.amax(-1), bits)
    code = _encode(grouped, scale[:, None], zero[:, None], bits)
    rounded = (
        code.to(values.dtype) * scale.to(values.dtype)[:, None] + zero.to(values.dtype)[:, None]
    )
    return rounded.reshape(-1), code.reshape(-1), scale, zero


def gptq_neurons(
    neuron_major: Tensor,
    bits: Tensor,
    group_size: int,
    gram: Tensor,
    *,
    act_order: bool = True,
    damp: float = 1e-2,
    block_size: int = 128,
) -> NeuronQuantization:
    """GPTQ for down stored neuron-major (``W_down.T [m, d]``): the matmul's inputs are the m
    neurons, so GPTQ runs over neurons, quantizing each neuron vector whole (its groups along d
    get their scales when it is reached) and pushing its error onto the neurons not yet
    quantized through ``gram = sum h h^T [m, m]``.

    ``bits [m]``: each neuron's width; 16 keeps it as a bf16 float vector. Float neurons go last,
    so they absorb the quantized neurons' error for free (as OWQ's float columns do, arXiv
    2306.02272); the quantized ones run in index order or, with ``act_order``, by descending
    activation energy ``diag(gram)``.
    """
    where = "gptq_neurons"
    _check_matrix(neuron_major, where)
    rows, cols = neuron_major.shape
    _check_group(cols, group_size, where)
    _check_block(block_size, where)
    _check_gram(gram, rows, damp, where)
    widths = _check_neuron_bits(bits, rows, where)
    device = neuron_major.device
    floats = torch.nonzero(widths == FLOAT_LEVEL).flatten()
    order = _column_order(gram.detach().cpu(), act_order, floats)
    hinv = _inverse_hessian_factor(gram.detach().cpu()[order][:, order], rows, damp, device, where)
    weight = neuron_major.detach().to(torch.float64)[order.to(device)].clone()
    ordered_bits = widths[order].tolist()
    values = torch.empty_like(weight)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
    scales = torch.zeros(rows, cols // group_size, dtype=torch.float16, device=device)
    zeros = torch.zeros_like(scales)
    for start in range(0, rows, block_size):
        stop = min(start + block_size, rows)
        current = weight[start:stop].clone()
        errors = torch.zeros_like(current)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            position = start + i
            rounded, code, scale, zero = _round_row(current[i], ordered_bits[position], group_size)
            values[position] = rounded
            if code is not None:
                codes[position], scales[position], zeros[position] = code, scale, zero
            error = (current[i] - rounded) / hinv_block[i, i]
            current[i:] -= hinv_block[i, i:][:, None] * error[None, :]
            errors[i] = error
        weight[stop:] -= hinv[start:stop, stop:].T @ errors
    back = torch.empty_like(order)
    back[order] = torch.arange(rows)
    back = back.to(device)
    return NeuronQuantization(
        values=values[back].to(torch.float32),
        codes=codes[back],
        scales=scales[back],
        zeros=zeros[back],
        bits=widths.to(device),
        group_size=group_size,
    )


def rtn_neurons(neuron_major: Tensor, bits: Tensor, group_size: int) -> NeuronQuantization:
    """Round-to-nearest counterpart of :func:`gptq_neurons` (per-neuron widths, 16 = bf16)."""
    where = "rtn_neurons"
    _check_matrix(neuron_major, where)
    rows, cols = neuron_major.shape
    _check_group(cols, group_size, where)
    widths = _check_neuron_bits(bits, rows, where)
    weight = neuron_major.detach().to(torch.float32)
    values = weight.to(torch.bfloat16).to(torch.float32)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=weight.device)
    scales = torch.zeros(rows, cols // group_size, dtype=torch.float16, device=weight.device)
    zeros = torch.zeros_like(scales)
    for width in widths.unique().tolist():
        if width == FLOAT_LEVEL:
            continue
        index = torch.nonzero(widths == width).flatten().to(weight.device)
        q = quantize_groups(weight[index], width, group_size)
        values[index] = dequantize(q)
        codes[index] = unpack_codes(q)
        scales[index], zeros[index] = q.scales, q.zeros
    return NeuronQuantization(values, codes, scales, zeros, widths.to(weight.device), group_size)


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approximation.detach().to(torch.float64)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
