"""The stored form of a group-quantized matrix: codes packed in a bit stream, float16 scales and zeros.

A matrix ``[rows, cols]`` holds one neuron vector per row (rows of up/gate; for down, ``W_down.T`` so
its columns become rows). Groups of ``group_size`` consecutive entries along each row share a
float16 scale and zero: ``value = code * scale + zero`` with ``code`` in ``0..2^bits - 1``.

Bit packing: codes are laid out row-major and written as one little-endian bit stream, code ``i``
occupying stream bits ``i*bits .. i*bits + bits - 1`` (least significant first) and stream bit ``p``
being bit ``p % 8`` of byte ``p // 8``. For 4 bits this is the usual "low nibble first". The stream
takes exactly ``ceil(rows * cols * bits / 8)`` bytes.

The format lives with the split parts that store it; the quantizers that produce it
(ffsplit/compress/quant.py) build on it, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError

MIN_BITS = 2
MAX_BITS = 8
# Codes packed per chunk: bounds the bit-stream temporaries (bits bytes per code) to a few MiB.
# A multiple of 8 so that every chunk starts on a byte boundary.
_PACK_CHUNK = 1 << 20


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

    @classmethod
    def empty(cls, rows: int, cols: int, bits: int, group_size: int) -> QuantizedTensor:
        """An all-zero matrix in this format: the empty shell a saved part's weights load into."""
        _check_bits(bits, "QuantizedTensor.empty", low=1)
        _check_group(cols, group_size, "QuantizedTensor.empty")
        groups = (rows, cols // group_size)
        return cls(
            packed=torch.zeros(packed_size(rows * cols, bits), dtype=torch.uint8),
            scales=torch.zeros(groups, dtype=torch.float16),
            zeros=torch.zeros(groups, dtype=torch.float16),
            bits=bits,
            group_size=group_size,
            shape=(rows, cols),
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
