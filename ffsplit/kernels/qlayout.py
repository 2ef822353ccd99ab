"""Kernel layouts of group-quantized FFN weights (torch only: no Triton, safe to import anywhere).

The stored format (ffsplit/split/qformat.py) is a dense bit stream; the decode kernels
(ffsplit/kernels/qffn.py) want codes they can unpack with a shift and a mask per code, whole
groups per load, and scales they can fold in once per group. Repacked at fuse time, same bytes:

- **Units.** A unit holds ``E`` consecutive codes of one row (natural order: slot ``s`` of unit
  ``u`` is column ``u * E + s``; 4 bits pair the slots instead, see ``SLOT_COLUMNS``: slots k and
  k + 4 hold columns 2k and 2k + 1). A width is stored as up to three *planes* of 4, 2 or 1 bits
  (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1; 2, 4 and 8 are one plane), each plane's unit
  an int32, int16 or int8 holding the plane's bits of the same ``E`` codes (slot ``s`` at bits
  ``s * width``). For 2 and 8 bits this is exactly qformat's little-endian stream read as
  int32 (4 bits: the same bytes, nibbles paired); planes keep odd widths exact (3 bits cost 3 bits, not 4) and every plane of a width has
  the same number of units per row, so a kernel loads them as tensors of one shape.
- **Dequantisation trick.** A kernel ORs a code's bits into the mantissa of 1.0f at bit
  ``23 - bits``, giving ``v = 1 + c / 2^bits`` exactly with one shift and one and-or per plane
  (no int-to-float conversion, which runs at a quarter of the FMA rate on sm_90);
  ``c * s + z = v * S + (z - S)`` with ``S = 2^bits * s``, applied once per group.
- **First projection** (gate/up rows, groups along d): units row-major ``[rows, d / E]``.
- **Down projection** (stored neuron-major ``W_down.T [m, d]``, groups along d, i.e. along the
  outputs): group-major ``[d / group, m, group / E]`` units and ``[d / group, m]`` scales, so a
  program that owns one output group streams one contiguous block per neuron range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError

# (width, code bit offset) of each plane, lead plane first; E = codes per unit.
PLANES: dict[int, tuple[tuple[int, int], ...]] = {
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
    5: ((4, 0), (1, 4)),
    6: ((4, 0), (2, 4)),
    7: ((4, 0), (2, 4), (1, 6)),
    8: ((8, 0),),
}
CODES_PER_UNIT = {2: 16, 3: 16, 4: 8, 5: 8, 6: 8, 7: 8, 8: 4}
# Which column of its unit each slot holds (natural order when absent). 4 bits: slot k and slot
# k + 4 hold columns 2k and 2k + 1, so one shift and one and-or place two neighbouring columns in
# the two 16-bit halves of a register, as the tensor cores read them (qffn._unpack4_16).
SLOT_COLUMNS: dict[int, tuple[int, ...]] = {4: (0, 2, 4, 6, 1, 3, 5, 7)}
_UNIT_DTYPE = {8: torch.int8, 16: torch.int16, 32: torch.int32}
KERNEL_BITS = tuple(sorted(PLANES))


def planes(bits: int) -> tuple[tuple[int, int], ...]:
    if bits not in PLANES:
        raise FFSplitError(f"no kernel layout for {bits}-bit codes; supported: {KERNEL_BITS}")
    return PLANES[bits]


def pack_units(codes: Tensor, bits: int) -> list[Tensor]:
    """Codes uint8 ``[rows, cols]`` (each < 2^bits) -> one unit tensor per plane ``[rows, cols/E]``."""
    rows, cols = codes.shape
    per_unit = CODES_PER_UNIT[bits] if bits in CODES_PER_UNIT else planes(bits)
    if cols % per_unit:
        raise FFSplitError(f"pack_units: {cols} columns are not a multiple of {per_unit}")
    grouped = codes.to(torch.int64).view(rows, cols // per_unit, per_unit)
    if bits in SLOT_COLUMNS:
        grouped = grouped[..., list(SLOT_COLUMNS[bits])]  # slot s holds column SLOT_COLUMNS[s]
    out = []
    for width, offset in planes(bits):
        values = (grouped >> offset) & ((1 << width) - 1)
        shifts = torch.arange(per_unit, device=codes.device, dtype=torch.int64) * width
        unit = (values << shifts).sum(-1)  # disjoint bits: the sum is the bitwise or
        unit_bits = per_unit * width
        unit = torch.where(unit >= 1 << (unit_bits - 1), unit - (1 << unit_bits), unit)
        out.append(unit.to(_UNIT_DTYPE[unit_bits]).contiguous())
    return out


def units_from_stream(stream: Tensor, bits: int) -> Tensor:
    """The single plane of 2, 4 or 8-bit codes from qformat's stream read as int32 ``[rows, n]``
    (natural order): the stream itself, or for 4 bits its nibbles moved to their slots (eight
    shifts on int32 tensors; no unpacking to one code per byte)."""
    if bits not in SLOT_COLUMNS:
        return stream
    natural = stream.to(torch.int64) & 0xFFFFFFFF
    width = 32 // len(SLOT_COLUMNS[bits])
    mask = (1 << width) - 1
    out = torch.zeros_like(natural)
    for slot, column in enumerate(SLOT_COLUMNS[bits]):
        out |= ((natural >> (column * width)) & mask) << (slot * width)
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_units(units: list[Tensor], bits: int) -> Tensor:
    """Inverse of :func:`pack_units`: codes uint8 ``[rows, cols]``."""
    per_unit = CODES_PER_UNIT[bits]
    rows, count = units[0].shape
    codes = torch.zeros(rows, count, per_unit, dtype=torch.int64, device=units[0].device)
    slots = torch.arange(per_unit, device=units[0].device, dtype=torch.int64)
    for (width, offset), unit in zip(planes(bits), units, strict=True):
        unsigned = unit.to(torch.int64) & ((1 << (per_unit * width)) - 1)
        codes |= ((unsigned[..., None] >> (slots * width)) & ((1 << width) - 1)) << offset
    if bits in SLOT_COLUMNS:
        natural = torch.empty_like(codes)
        natural[..., list(SLOT_COLUMNS[bits])] = codes
        codes = natural
    return codes.view(rows, count * per_unit).to(torch.uint8)


def group_major(units: Tensor, group: int, per_unit: int) -> Tensor:
    """Row-major units ``[rows, cols/E]`` -> ``[cols/group, rows, group/E]`` (down layout)."""
    rows, count = units.shape
    per_group = group // per_unit
    return units.view(rows, count // per_group, per_group).transpose(0, 1).contiguous()


def row_major(units: Tensor) -> Tensor:
    """Inverse of :func:`group_major`: ``[groups, rows, per_group]`` -> ``[rows, groups*per_group]``."""
    groups, rows, per_group = units.shape
    return units.transpose(0, 1).reshape(rows, groups * per_group)


@dataclass
class QuantBlock:
    """One quantized neuron range of an FFN in kernel layout (see module doc).

    first: units per plane ``[(2 if gated else 1) * n, d / E]`` (gate rows then up rows);
    first_scales / first_zeros float16 ``[rows, d / group]``;
    down: units per plane ``[d / group, n, group / E]``; down_scales / down_zeros float16
    ``[d / group, n]``. ``n`` is padded to a multiple of 16 with zero rows (code 0, scale 0,
    zero 0: a zero weight).
    """

    bits: int
    group: int
    neurons: int  # padded
    first: list[Tensor]
    first_scales: Tensor
    first_zeros: Tensor
    down: list[Tensor]
    down_scales: Tensor
    down_zeros: Tensor

    @property
    def per_unit(self) -> int:
        return CODES_PER_UNIT[self.bits]

    def tensors(self) -> list[Tensor]:
        return [
            *self.first,
            self.first_scales,
            self.first_zeros,
            *self.down,
            self.down_scales,
            self.down_zeros,
        ]


def dequantize_first(block: QuantBlock, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference: the first-projection rows ``[rows, d]`` from the kernel layout (float32 math)."""
    codes = unpack_units(block.first, block.bits).to(torch.float32)
    return _apply_groups(codes, block.first_scales, block.first_zeros, block.group).to(dtype)


def dequantize_down(block: QuantBlock, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference: the down rows ``W_down.T [n, d]`` from the group-major kernel layout."""
    units = [row_major(u) for u in block.down]
    codes = unpack_units(units, block.bits).to(torch.float32)
    return _apply_groups(codes, block.down_scales.t(), block.down_zeros.t(), block.group).to(dtype)


def _apply_groups(codes: Tensor, scales: Tensor, zeros: Tensor, group: int) -> Tensor:
    rows, cols = codes.shape
    grouped = codes.view(rows, cols // group, group)
    values = grouped * scales.float()[..., None] + zeros.float()[..., None]
    return values.view(rows, cols)


def block_nbytes(block: QuantBlock) -> int:
    return sum(t.numel() * t.element_size() for t in block.tensors())


def kernel_group_ok(group: int, d: int) -> bool:
    """Groups the decode kernels tile: a power of two of at least 16 dividing d (tiles in Triton
    have power-of-two sizes; 16 is the smallest group pick_group_size gives)."""
    return group >= 16 and group & (group - 1) == 0 and d % group == 0
