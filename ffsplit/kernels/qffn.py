"""Decode kernels for FFNs with quantized parts: one launch per projection stage for every format.

An FFN fused by ffsplit/split/fused.py (``QuantFFNCore``) is a list of neuron *segments*: at most
one dense (bf16/fp16) segment, then one quantized segment per bit width (heavy int8, light int4 +
int3 as the two-level solver mixes them, up to six widths from the layer allocation), all of one
group size. Two launches per FFN for up to three quantized segments (the kernels' slots), each
streaming every segment's weights once; more segments take further launches of three
(``MAX_SEGMENTS``):

1. ``first``: hidden ``[T, m]`` (fp32) = ``act(x G^T) * (x U^T)`` for every neuron; programs are
   blocks of ``BLOCK_N`` neurons of one segment (dense blocks first, then each quantized segment),
   times ``SPLIT`` slices of d (split-K: partial sums in a workspace, the last slice to arrive
   adds them and applies the activation: the pattern of ffsplit/kernels/ffn.py).
2. ``last``: ``y [T, d] = sum over segments of hidden_seg @ W_down_seg + bias``; programs are
   blocks of ``BLOCK_O`` outputs (inside one quantization group) times ``SPLIT`` slices that take
   the same share of every segment's neurons (balanced bytes per slice).

Quantized values are unpacked with the mantissa trick of ffsplit/kernels/qlayout.py
(``v = 1 + c / 2^b`` from one shift and one and-or per plane; no int-to-float conversion) and
scales are folded in once per group: at one token (CUDA-core GEMV, ``BLOCK_T`` 1) the first stage
sums ``x * v`` over each group and applies ``S = 2^b s`` and ``(z - S) * sum(x)`` per group and
row; the down stage pre-multiplies the hidden activation by its neuron's scale (down's groups run
along the outputs, so one scale per neuron and program). From 2 to 16 tokens (``BLOCK_T`` 16) the
values go through tensor cores: ``first`` dequantises a [BLOCK_N, BLOCK_K] tile to bf16 per
element, ``last`` multiplies exact integer codes (bf16 holds 0..256 exactly) by ``h * s``; 4-bit
codes can skip the fp32 detour (``_unpack4_16``: two values per shift and and-or, straight into
the operand registers; ``group_dot`` 2 and ``HALF``).

Layouts come from qlayout (units of E codes, natural order but 4-bit slots paired; down
group-major). Everything is
static-shape and sync-free (CUDA graphs, torch.compile via the custom ops at the end). Nothing
here is imported by ``import ffsplit``; Triton is optional. Measurements: bench/results/NOTES-h200.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.kernels import interpreting
from ffsplit.kernels.ffn import _act_store, _arrive, _gather, _k_slice, _row_dot

MAX_TOKENS = 16  # decode kernels up to this many tokens (the tile's rows); prefill above
# Quantized segments per launch (the kernels' three slots). An FFN with more widths (the layer
# allocation gives up to six: 8, 6, 5, 4, 3, 2) runs in launches of three: the first stage's
# write disjoint hidden columns, the down stage's later launches add to y (ACCUMULATE).
MAX_SEGMENTS = 3
MAGIC = 0x3F800000  # bits of 1.0f, passed as an argument (see _slot)


# ------------------------------------------------------------------------------------ unpacking


@triton.jit
def _place(u, SRC: tl.constexpr, DST: tl.constexpr, WIDTH: tl.constexpr):
    """Bits [SRC, SRC + WIDTH) of the uint32 units u moved to [DST, DST + WIDTH), others 0."""
    MASK: tl.constexpr = ((1 << WIDTH) - 1) << DST
    if DST >= SRC:
        r = (u << (DST - SRC)) & MASK
    else:
        r = (u >> (SRC - DST)) & MASK
    return r


@triton.jit
def _slot(u0, u1, u2, magic, S: tl.constexpr, BITS: tl.constexpr):
    """v = 1 + c / 2^BITS (fp32, exact) of slot S of every unit: the code's bits placed at the
    top of the mantissa of 1.0 (qlayout.PLANES says which plane holds which bits). ``magic`` is
    1.0f's bits, 0x3F800000, passed in at run time: as a register, ``(bits & mask) | magic`` is
    one LOP3 (an immediate would need a second one: LOP3 takes one immediate)."""
    D: tl.constexpr = 23 - BITS
    if BITS == 3:
        r = _place(u0, S * 2, D, 2) | _place(u1, S, D + 2, 1)
    elif BITS == 5:
        r = _place(u0, S * 4, D, 4) | _place(u1, S, D + 4, 1)
    elif BITS == 6:
        r = _place(u0, S * 4, D, 4) | _place(u1, S * 2, D + 4, 2)
    elif BITS == 7:
        r = _place(u0, S * 4, D, 4) | _place(u1, S * 2, D + 4, 2) | _place(u2, S, D + 6, 1)
    elif BITS == 4:  # one plane, slots paired (qlayout.SLOT_COLUMNS): column S in slot SRC
        SRC: tl.constexpr = S // 2 + 4 * (S % 2)
        r = _place(u0, SRC * 4, D, 4)
    else:  # 2, 8: one plane
        r = _place(u0, S * BITS, D, BITS)
    return (r | magic).to(tl.float32, bitcast=True)


@triton.jit
def _unpack(u0, u1, u2, magic, BITS: tl.constexpr, E: tl.constexpr):
    """Units [..., U] -> values [..., U * E] in natural order (slot s of unit u at u * E + s).
    Interleaving is register-local: tree(slots) = interleave(tree(evens), tree(odds))."""
    if E == 4:
        out = tl.interleave(
            tl.interleave(_slot(u0, u1, u2, magic, 0, BITS), _slot(u0, u1, u2, magic, 2, BITS)),
            tl.interleave(_slot(u0, u1, u2, magic, 1, BITS), _slot(u0, u1, u2, magic, 3, BITS)),
        )
    elif E == 8:
        out = tl.interleave(
            tl.interleave(
                tl.interleave(_slot(u0, u1, u2, magic, 0, BITS), _slot(u0, u1, u2, magic, 4, BITS)),
                tl.interleave(_slot(u0, u1, u2, magic, 2, BITS), _slot(u0, u1, u2, magic, 6, BITS)),
            ),
            tl.interleave(
                tl.interleave(_slot(u0, u1, u2, magic, 1, BITS), _slot(u0, u1, u2, magic, 5, BITS)),
                tl.interleave(_slot(u0, u1, u2, magic, 3, BITS), _slot(u0, u1, u2, magic, 7, BITS)),
            ),
        )
    else:  # 16
        out = tl.interleave(
            tl.interleave(
                tl.interleave(
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 0, BITS), _slot(u0, u1, u2, magic, 8, BITS)
                    ),
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 4, BITS), _slot(u0, u1, u2, magic, 12, BITS)
                    ),
                ),
                tl.interleave(
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 2, BITS), _slot(u0, u1, u2, magic, 10, BITS)
                    ),
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 6, BITS), _slot(u0, u1, u2, magic, 14, BITS)
                    ),
                ),
            ),
            tl.interleave(
                tl.interleave(
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 1, BITS), _slot(u0, u1, u2, magic, 9, BITS)
                    ),
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 5, BITS), _slot(u0, u1, u2, magic, 13, BITS)
                    ),
                ),
                tl.interleave(
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 3, BITS), _slot(u0, u1, u2, magic, 11, BITS)
                    ),
                    tl.interleave(
                        _slot(u0, u1, u2, magic, 7, BITS), _slot(u0, u1, u2, magic, 15, BITS)
                    ),
                ),
            ),
        )
    return out


@triton.jit
def _half(r, HI: tl.constexpr, DT: tl.constexpr):
    """The low (HI False) or high 16 bits of the uint32 r as a DT (bf16/fp16) value."""
    if HI:
        r = r >> 16
    return r.to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _pair4(u, one2, K: tl.constexpr, P: tl.constexpr):
    """Slots k and k + 4 of each 4-bit unit (bits 4k and 16 + 4k: columns 2k and 2k + 1) as the
    two 16-bit halves of one register, each ``1 + c/16`` in DT: one shift and one and-or for two
    codes (the nibbles sit 16 bits apart, so one mask places both under the mantissa of 1.0 in
    each half). ``one2`` holds 1.0 in both halves, as a register (see _slot: LOP3 takes one
    immediate)."""
    MASK: tl.constexpr = (0xF << P) | (0xF << (P + 16))  # P: the code's lowest bit
    if 4 * K >= P:
        r = u >> (4 * K - P)
    else:
        r = u << (P - 4 * K)
    return (r & MASK) | one2


@triton.jit
def _unpack4_16(u, magic, DT: tl.constexpr, INTEGER: tl.constexpr):
    """4-bit units [..., U] (E = 8, slots paired) -> values ``1 + c/16`` [..., 8 U] in DT, built
    in 16 bits (exact: 4 bits fit both mantissas). Register k holds columns 2k and 2k + 1, the
    pair a tensor-core operand register holds, so no repacking follows: one instruction per code
    against ~2.5 for the fp32 unpack plus the conversion (scripts/sass_count.py: the first stage's
    loop at 16 tokens, 64 x 128 tiles, 402 -> 289 instructions).
    INTEGER: the codes ``c`` themselves (exact), as ``(B + c) - B`` with B = 128 (bf16) or 1024
    (fp16), the base whose unit in the last place is 1: one subtraction per two codes more.
    ``magic`` is 1.0f's bits (0x3F800000, a run-time value): bf16 1.0 is its top half (0x3F80),
    fp16 1.0 is 0x3C00 = 0x3F80 - 0x380; 128 in bf16 is 0x4300, 1024 in fp16 0x6400."""
    top = magic.to(tl.uint32) >> 16
    if INTEGER:
        P: tl.constexpr = 0
        if DT == tl.float16:
            top = top + 0x2480
        else:
            top = top + 0x380
    else:
        P: tl.constexpr = 3 if DT == tl.bfloat16 else 6  # top of the mantissa: 7 or 10 bits
        if DT == tl.float16:
            top = top - 0x380
    one2 = top | (top << 16)
    r0 = _pair4(u, one2, 0, P)
    r1 = _pair4(u, one2, 1, P)
    r2 = _pair4(u, one2, 2, P)
    r3 = _pair4(u, one2, 3, P)
    v = tl.interleave(
        tl.interleave(
            tl.interleave(_half(r0, False, DT), _half(r2, False, DT)),
            tl.interleave(_half(r1, False, DT), _half(r3, False, DT)),
        ),
        tl.interleave(
            tl.interleave(_half(r0, True, DT), _half(r2, True, DT)),
            tl.interleave(_half(r1, True, DT), _half(r3, True, DT)),
        ),
    )
    if INTEGER:
        v = v - (1024.0 if DT == tl.float16 else 128.0)
    return v


@triton.jit
def _load_units(p0, p1, p2, offs, mask, PLANES: tl.constexpr):
    """The planes' units at offs as uint32 (int16/int8 planes zero-extended); absent planes
    alias the lead plane's values (never read by _slot)."""
    u0 = tl.load(p0 + offs, mask=mask, other=0, eviction_policy="evict_first")
    u0 = u0.to(tl.uint32, bitcast=True)
    u1 = u0
    u2 = u0
    if PLANES >= 2:
        a = tl.load(p1 + offs, mask=mask, other=0, eviction_policy="evict_first")
        if a.dtype == tl.int16:
            u1 = a.to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            u1 = a.to(tl.uint8, bitcast=True).to(tl.uint32)
    if PLANES >= 3:
        b = tl.load(p2 + offs, mask=mask, other=0, eviction_policy="evict_first")
        u2 = b.to(tl.uint8, bitcast=True).to(tl.uint32)
    return u0, u1, u2


# ---------------------------------------------------------------------------- first projection


@triton.jit
def _q_row_dot(
    acc,
    x_ptr,
    stride_x,
    T,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    magic,
    rows,
    rows_ok,
    k_lo,
    k_hi,
    units_per_row,
    n_groups,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """acc[t, n] += x[t, k_lo:k_hi] . dequant(row rows[n]) for quantized rows (units
    [rows, units_per_row], scales/zeros [rows, n_groups]). A step loads [BLOCK_N, BLOCK_K / E]
    units (16-byte vectors: a thread holds 4 units, CH codes, inside one group), unpacks them and
    works on chunks of CH codes: one token sums x * v over each chunk inside the thread (no
    shuffles) and scales the chunk sums; tiles scale every value and multiply on tensor cores."""
    CH: tl.constexpr = 4 * E if 4 * E < GROUP else GROUP
    NCH: tl.constexpr = BLOCK_K // CH
    ku = tl.arange(0, BLOCK_K // E)
    ch = tl.arange(0, NCH)
    kk = tl.arange(0, BLOCK_K)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    row_units = rows.to(tl.int64)[:, None] * tl.multiple_of(units_per_row, 4)
    row_meta = rows[:, None] * n_groups
    if BLOCK_T == 1:
        acc2 = tl.zeros((BLOCK_N, NCH), tl.float32)
    else:
        acc_t = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)  # weights as the A operand
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k0 = tl.multiple_of(k0, BLOCK_K)
        u0, u1, u2 = _load_units(
            p0, p1, p2, row_units + (k0 // E + ku)[None, :], rows_ok[:, None], PLANES
        )
        meta = row_meta + ((k0 + ch * CH) // GROUP)[None, :]
        scale = tl.load(s_ptr + meta, mask=rows_ok[:, None], other=0.0).to(tl.float32)
        scale = scale * (1 << BITS)
        zero = tl.load(z_ptr + meta, mask=rows_ok[:, None], other=0.0).to(tl.float32) - scale
        v = _unpack(u0, u1, u2, magic, BITS, E)  # [BLOCK_N, BLOCK_K]
        if BLOCK_T == 1:
            x = tl.load(x_ptr + k0 + kk).to(tl.float32)
            part = tl.sum(tl.reshape(v * x[None, :], (BLOCK_N, NCH, CH)), axis=2)
            x_sum = tl.sum(tl.reshape(x, (NCH, CH)), axis=1)
            acc2 += part * scale + zero * x_sum[None, :]
        else:
            w = tl.reshape(v, (BLOCK_N, NCH, CH)) * scale[:, :, None] + zero[:, :, None]
            w = tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_N, BLOCK_K))
            xt = tl.load(x_ptr + t[None, :] * stride_x + (k0 + kk)[:, None], mask=t_ok[None, :])
            acc_t += tl.dot(w, xt)
    if BLOCK_T == 1:
        acc += tl.sum(acc2, axis=1)[None, :]
    else:
        acc += tl.trans(acc_t)
    return acc


@triton.jit
def _q_row_dot_groups(
    acc,
    x_ptr,
    stride_x,
    T,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    magic,
    rows,
    rows_ok,
    k_lo,
    k_hi,
    units_per_row,
    n_groups,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    HALF: tl.constexpr,
):
    """The tensor-core variant of _q_row_dot that scales per group instead of per value: one
    dot per group on the unscaled values (v = 1 + c/2^b is exact in bf16/fp16 up to 7 bits; 8-bit
    codes go in as integers), scaled per row and group in the fp32 accumulator, plus the zero
    term from a dot of x with ones (the group sums of x, on tensor cores instead of shuffles).
    HALF (4-bit codes): the values are unpacked in 16 bits (_unpack4_16); a reduction of the x
    tile for the group sums instead of the ones-dot cost more (~50 instructions a step)."""
    KG: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
    G_IT: tl.constexpr = BLOCK_K // KG
    ku = tl.arange(0, KG // E)
    kk = tl.arange(0, KG)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    row_units = rows.to(tl.int64)[:, None] * tl.multiple_of(units_per_row, 4)
    row_meta = rows * n_groups
    dt = x_ptr.dtype.element_ty
    ones = tl.full((BLOCK_N, KG), 1.0, dt)
    acc_t = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)  # weights as the A operand
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k0 = tl.multiple_of(k0, BLOCK_K)
        for gi in tl.static_range(G_IT):
            kb = k0 + gi * KG
            u0, u1, u2 = _load_units(
                p0, p1, p2, row_units + (kb // E + ku)[None, :], rows_ok[:, None], PLANES
            )
            scale = tl.load(s_ptr + row_meta + kb // GROUP, mask=rows_ok, other=0.0)
            zero = tl.load(z_ptr + row_meta + kb // GROUP, mask=rows_ok, other=0.0)
            scale = scale.to(tl.float32)
            zero = zero.to(tl.float32)
            xt = tl.load(x_ptr + t[None, :] * stride_x + (kb + kk)[:, None], mask=t_ok[None, :])
            if HALF and BITS == 4 and E == 8:
                v16 = _unpack4_16(u0, magic, dt, False)  # [BLOCK_N, KG], 1 + c/16
                scale = scale * 16.0
                zero = zero - scale
                part = tl.dot(v16, xt)
                x_sum = tl.dot(ones, xt)
                acc_t = tl.fma(part, scale[:, None], acc_t)
                acc_t = tl.fma(x_sum, zero[:, None], acc_t)
            else:
                v = _unpack(u0, u1, u2, magic, BITS, E)  # [BLOCK_N, KG]
                if BITS == 8:
                    v = v * 256.0 - 256.0  # the integer codes: 1 + c/256 is not exact in 16 bits
                else:
                    scale = scale * (1 << BITS)
                    zero = zero - scale
                part = tl.dot(v.to(dt), xt)
                x_sum = tl.dot(ones, xt)
                acc_t += part * scale[:, None] + x_sum * zero[:, None]
    return acc + tl.trans(acc_t)


@triton.jit
def _q_rows(
    acc,
    x_ptr,
    stride_x,
    T,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    magic,
    rows,
    rows_ok,
    k_lo,
    k_hi,
    units_per_row,
    n_groups,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP_DOT: tl.constexpr,
):
    """Quantized rows' dot products: _q_row_dot_groups for tiles when GROUP_DOT (2: with the
    16-bit unpack of 4-bit codes), else _q_row_dot."""
    if BLOCK_T > 1 and GROUP_DOT > 0:
        acc = _q_row_dot_groups(
            acc,
            x_ptr,
            stride_x,
            T,
            p0,
            p1,
            p2,
            s_ptr,
            z_ptr,
            magic,
            rows,
            rows_ok,
            k_lo,
            k_hi,
            units_per_row,
            n_groups,
            BITS,
            E,
            PLANES,
            GROUP,
            BLOCK_T,
            BLOCK_N,
            BLOCK_K,
            STAGES,
            GROUP_DOT == 2,
        )
    else:
        acc = _q_row_dot(
            acc,
            x_ptr,
            stride_x,
            T,
            p0,
            p1,
            p2,
            s_ptr,
            z_ptr,
            magic,
            rows,
            rows_ok,
            k_lo,
            k_hi,
            units_per_row,
            n_groups,
            BITS,
            E,
            PLANES,
            GROUP,
            BLOCK_T,
            BLOCK_N,
            BLOCK_K,
            STAGES,
        )
    return acc


@triton.jit
def _first_epilogue(
    acc_g,
    acc_u,
    b_ptr,
    m_total,
    cols,
    cols_ok,
    h_ptr,
    stride_h,
    t,
    t_ok,
    ws_ptr,
    plane,
    ws_cols,
    cnt_ptr,
    pid,
    s,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """hidden[t, cols] = act(g + b_g) * (u + b_u); with SPLIT > 1 through the workspace and the
    arrival counter (the last slice of the block reduces, then resets the counter)."""
    if GATED:
        u_bias_rows = cols + m_total  # bias [2, m_total]: gate then up
    else:
        u_bias_rows = cols
    if SPLIT == 1:
        _act_store(
            acc_g,
            acc_u,
            b_ptr,
            cols,
            u_bias_rows,
            cols_ok,
            h_ptr,
            stride_h,
            cols,
            t,
            t_ok,
            GATED,
            ACT,
            HAS_BIAS,
        )
    else:
        mask = t_ok[:, None] & cols_ok[None, :]
        ws = ws_ptr + t[:, None] * ws_cols + cols[None, :]
        tl.store(ws + (2 * s + 1) * plane, acc_u, mask=mask)
        if GATED:
            tl.store(ws + 2 * s * plane, acc_g, mask=mask)
        arrived = _arrive(cnt_ptr + pid)
        if arrived == SPLIT - 1:
            sum_u = _gather(ws + plane, mask, 2 * plane, SPLIT)
            if GATED:
                sum_g = _gather(ws, mask, 2 * plane, SPLIT)
            else:
                sum_g = sum_u
            _act_store(
                sum_g,
                sum_u,
                b_ptr,
                cols,
                u_bias_rows,
                cols_ok,
                h_ptr,
                stride_h,
                cols,
                t,
                t_ok,
                GATED,
                ACT,
                HAS_BIAS,
            )
            tl.store(cnt_ptr + pid, 0)


@triton.jit
def _q_first_block(
    x_ptr,
    stride_x,
    T,
    d,
    magic,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    n_seg,
    col0,
    j,
    s,
    b_ptr,
    m_total,
    h_ptr,
    stride_h,
    ws_ptr,
    plane,
    ws_cols,
    cnt_ptr,
    pid,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP_DOT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Block j of one quantized segment (gate rows [0, n_seg), up rows [n_seg, 2 n_seg)).
    GROUP_DOT picks _q_row_dot_groups for tiles (scales per group, not per value)."""
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    k_lo, k_hi = _k_slice(d, s, SPLIT, BLOCK_K)
    n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (n < n_seg) | EVEN  # EVEN: whole blocks only, the masks fold away
    zeros = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    if GATED:
        up_rows = n + n_seg
    else:
        up_rows = n
    acc_u = _q_rows(
        zeros,
        x_ptr,
        stride_x,
        T,
        p0,
        p1,
        p2,
        s_ptr,
        z_ptr,
        magic,
        up_rows,
        n_ok,
        k_lo,
        k_hi,
        d // E,
        d // GROUP,
        BITS,
        E,
        PLANES,
        GROUP,
        BLOCK_T,
        BLOCK_N,
        BLOCK_K,
        STAGES,
        GROUP_DOT,
    )
    if GATED:
        acc_g = _q_rows(
            zeros,
            x_ptr,
            stride_x,
            T,
            p0,
            p1,
            p2,
            s_ptr,
            z_ptr,
            magic,
            n,
            n_ok,
            k_lo,
            k_hi,
            d // E,
            d // GROUP,
            BITS,
            E,
            PLANES,
            GROUP,
            BLOCK_T,
            BLOCK_N,
            BLOCK_K,
            STAGES,
            GROUP_DOT,
        )
    else:
        acc_g = acc_u
    _first_epilogue(
        acc_g,
        acc_u,
        b_ptr,
        m_total,
        col0 + n,
        n_ok,
        h_ptr,
        stride_h,
        t,
        t_ok,
        ws_ptr,
        plane,
        ws_cols,
        cnt_ptr,
        pid,
        s,
        GATED,
        ACT,
        HAS_BIAS,
        SPLIT,
    )


@triton.jit
def _qfirst_kernel(
    x_ptr,
    stride_x,
    T,
    d,
    magic,
    w_ptr,
    m_dense,
    b_ptr,
    m_total,
    h_ptr,
    stride_h,
    ws_ptr,
    cnt_ptr,
    a0,
    a1,
    a2,
    a_s,
    a_z,
    a_n,
    a_col,
    b0,
    b1,
    b2,
    b_s,
    b_z,
    b_n,
    b_col,
    c0,
    c1,
    c2,
    c_s,
    c_z,
    c_n,
    c_col,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BITS_A: tl.constexpr,
    E_A: tl.constexpr,
    PLANES_A: tl.constexpr,
    BITS_B: tl.constexpr,
    E_B: tl.constexpr,
    PLANES_B: tl.constexpr,
    BITS_C: tl.constexpr,
    E_C: tl.constexpr,
    PLANES_C: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP_DOT: tl.constexpr = 0,
    EVEN: tl.constexpr = False,
):
    # grid: (blocks of the dense segment, then of segments A, B, C; SPLIT slices of d)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    plane = T * m_total  # floats per (slice, gate/up) plane of the workspace
    n_dense = tl.cdiv(m_dense, BLOCK_N)
    n_a = tl.cdiv(a_n, BLOCK_N)
    n_b = tl.cdiv(b_n, BLOCK_N)
    if pid < n_dense:
        t = tl.arange(0, BLOCK_T)
        t_ok = t < T
        k_lo, k_hi = _k_slice(d, s, SPLIT, BLOCK_K)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < m_dense) | EVEN
        zeros = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        if GATED:
            up_rows = n + m_dense
        else:
            up_rows = n
        acc_u = _row_dot(
            zeros,
            x_ptr,
            stride_x,
            T,
            w_ptr,
            up_rows,
            n_ok,
            k_lo,
            k_hi,
            d,
            BLOCK_T,
            BLOCK_N,
            BLOCK_K,
            STAGES,
        )
        if GATED:
            acc_g = _row_dot(
                zeros,
                x_ptr,
                stride_x,
                T,
                w_ptr,
                n,
                n_ok,
                k_lo,
                k_hi,
                d,
                BLOCK_T,
                BLOCK_N,
                BLOCK_K,
                STAGES,
            )
        else:
            acc_g = acc_u
        _first_epilogue(
            acc_g,
            acc_u,
            b_ptr,
            m_total,
            n,
            n_ok,
            h_ptr,
            stride_h,
            t,
            t_ok,
            ws_ptr,
            plane,
            m_total,
            cnt_ptr,
            pid,
            s,
            GATED,
            ACT,
            HAS_BIAS,
            SPLIT,
        )
    elif pid < n_dense + n_a:
        if BITS_A > 0:
            _q_first_block(
                x_ptr,
                stride_x,
                T,
                d,
                magic,
                a0,
                a1,
                a2,
                a_s,
                a_z,
                a_n,
                a_col,
                pid - n_dense,
                s,
                b_ptr,
                m_total,
                h_ptr,
                stride_h,
                ws_ptr,
                plane,
                m_total,
                cnt_ptr,
                pid,
                GATED,
                ACT,
                HAS_BIAS,
                BITS_A,
                E_A,
                PLANES_A,
                GROUP,
                BLOCK_T,
                BLOCK_N,
                BLOCK_K,
                SPLIT,
                STAGES,
                GROUP_DOT,
                EVEN,
            )
    elif pid < n_dense + n_a + n_b:
        if BITS_B > 0:
            _q_first_block(
                x_ptr,
                stride_x,
                T,
                d,
                magic,
                b0,
                b1,
                b2,
                b_s,
                b_z,
                b_n,
                b_col,
                pid - n_dense - n_a,
                s,
                b_ptr,
                m_total,
                h_ptr,
                stride_h,
                ws_ptr,
                plane,
                m_total,
                cnt_ptr,
                pid,
                GATED,
                ACT,
                HAS_BIAS,
                BITS_B,
                E_B,
                PLANES_B,
                GROUP,
                BLOCK_T,
                BLOCK_N,
                BLOCK_K,
                SPLIT,
                STAGES,
                GROUP_DOT,
                EVEN,
            )
    else:
        if BITS_C > 0:
            _q_first_block(
                x_ptr,
                stride_x,
                T,
                d,
                magic,
                c0,
                c1,
                c2,
                c_s,
                c_z,
                c_n,
                c_col,
                pid - n_dense - n_a - n_b,
                s,
                b_ptr,
                m_total,
                h_ptr,
                stride_h,
                ws_ptr,
                plane,
                m_total,
                cnt_ptr,
                pid,
                GATED,
                ACT,
                HAS_BIAS,
                BITS_C,
                E_C,
                PLANES_C,
                GROUP,
                BLOCK_T,
                BLOCK_N,
                BLOCK_K,
                SPLIT,
                STAGES,
                GROUP_DOT,
                EVEN,
            )


# ------------------------------------------------------------------------------ down projection


@triton.jit
def _q_down(
    acc,
    zacc,
    h_ptr,
    stride_h,
    T,
    magic,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    n_seg,
    col0,
    s,
    o0,
    d,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    DOT: tl.constexpr,
    EVEN: tl.constexpr,
    HALF: tl.constexpr,
):
    """This slice's share of one quantized segment's neurons, outputs [o0, o0 + BLOCK_O) (inside
    one group g). Units group-major [d/GROUP, n_seg, GROUP/E]; scales/zeros [d/GROUP, n_seg].
    One token: acc [BLOCK_J, BLOCK_O] += (h * 2^b s)[:, None] * v, zacc [BLOCK_J] += h (z - S);
    tiles: acc [BLOCK_T, BLOCK_O] += (h * s) @ codes, zacc [BLOCK_T, BLOCK_J] += h z, summed by
    the caller after the loop (DOT: the model's 16-bit dtype, the tensor-core operand type;
    HALF: 4-bit codes unpacked in 16 bits, _unpack4_16)."""
    UPG: tl.constexpr = GROUP // E
    g = o0 // GROUP
    if BLOCK_O == GROUP:
        unit0 = 0  # known to the compiler: 16-byte unit loads
    else:
        unit0 = (o0 % GROUP) // E
    ui = tl.arange(0, BLOCK_O // E)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    j_lo, j_hi = _k_slice(n_seg, s, SPLIT, BLOCK_J)
    base_units = g.to(tl.int64) * (tl.multiple_of(n_seg, 16) * UPG) + unit0
    base_meta = g * n_seg
    for j0 in tl.range(j_lo, j_hi, BLOCK_J, num_stages=STAGES):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = (j < j_hi) | EVEN
        offs = base_units + j[:, None] * UPG + ui[None, :]
        u0, u1, u2 = _load_units(p0, p1, p2, offs, j_ok[:, None], PLANES)
        scale = tl.load(s_ptr + base_meta + j, mask=j_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + base_meta + j, mask=j_ok, other=0.0).to(tl.float32)
        if BLOCK_T == 1:
            v = _unpack(u0, u1, u2, magic, BITS, E)  # [BLOCK_J, BLOCK_O]
            h = tl.load(h_ptr + col0 + j, mask=j_ok, other=0.0)
            big = scale * (1 << BITS)
            acc += v * (h * big)[:, None]
            zacc += h * (zero - big)
        else:
            h = tl.load(
                h_ptr + t[:, None] * stride_h + (col0 + j)[None, :],
                mask=t_ok[:, None] & j_ok[None, :],
                other=0.0,
            )
            if HALF and BITS == 4 and E == 8:
                codes = _unpack4_16(u0, magic, DOT, True)  # 16-bit unpack (see _unpack4_16)
            else:
                v = _unpack(u0, u1, u2, magic, BITS, E)  # [BLOCK_J, BLOCK_O]
                codes = ((v - 1.0) * (1 << BITS)).to(DOT)  # exact integers 0..255 in bf16/fp16
            acc += tl.dot((h * scale[None, :]).to(DOT), codes)
            zacc += h * zero[None, :]  # [BLOCK_T, BLOCK_J]: summed once, after the loop
    return acc, zacc


@triton.jit
def _dense_down(
    acc,
    h_ptr,
    stride_h,
    T,
    w_ptr,
    m_dense,
    s,
    o,
    o_ok,
    d,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    EVEN: tl.constexpr,
):
    """This slice's share of the dense neurons: W_down^T rows [m_dense, d] (neuron-major)."""
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    j_lo, j_hi = _k_slice(m_dense, s, SPLIT, BLOCK_J)
    for j0 in tl.range(j_lo, j_hi, BLOCK_J, num_stages=STAGES):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = (j < j_hi) | EVEN
        w = tl.load(
            w_ptr + j.to(tl.int64)[:, None] * d + o[None, :],
            mask=j_ok[:, None] & o_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        if BLOCK_T == 1:
            h = tl.load(h_ptr + j, mask=j_ok, other=0.0)
            acc += w.to(tl.float32) * h[:, None]
        else:
            h = tl.load(
                h_ptr + t[:, None] * stride_h + j[None, :],
                mask=t_ok[:, None] & j_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(h.to(w.dtype), w)
    return acc


@triton.jit
def _qlast_kernel(
    h_ptr,
    stride_h,
    T,
    d,
    magic,
    y_ptr,
    stride_y,
    bias_ptr,
    w_ptr,
    m_dense,
    ws_ptr,
    cnt_ptr,
    a0,
    a1,
    a2,
    a_s,
    a_z,
    a_n,
    a_col,
    b0,
    b1,
    b2,
    b_s,
    b_z,
    b_n,
    b_col,
    c0,
    c1,
    c2,
    c_s,
    c_z,
    c_n,
    c_col,
    HAS_BIAS: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    BITS_A: tl.constexpr,
    E_A: tl.constexpr,
    PLANES_A: tl.constexpr,
    BITS_B: tl.constexpr,
    E_B: tl.constexpr,
    PLANES_B: tl.constexpr,
    BITS_C: tl.constexpr,
    E_C: tl.constexpr,
    PLANES_C: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    EVEN: tl.constexpr = False,
    HALF: tl.constexpr = False,
    ACCUMULATE: tl.constexpr = False,
):
    # grid: (output blocks of BLOCK_O <= GROUP, SPLIT slices of every segment's neurons);
    # ACCUMULATE: y += this launch's sum (the later launches of an FFN with over three widths)
    # partial sums [SPLIT, T, d] as in ffsplit/kernels/ffn.py's last stage
    pid = tl.program_id(0)
    s = tl.program_id(1)
    o0 = pid * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    o_ok = o < d
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_J, BLOCK_O), tl.float32)
        zacc = tl.zeros((BLOCK_J,), tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_O), tl.float32)
        zacc = tl.zeros((BLOCK_T, BLOCK_J), tl.float32)
    if HAS_DENSE:
        acc = _dense_down(
            acc, h_ptr, stride_h, T, w_ptr, m_dense, s, o, o_ok, d,
            BLOCK_T, BLOCK_J, BLOCK_O, SPLIT, STAGES, EVEN,
        )  # fmt: skip
    if BITS_A > 0:
        acc, zacc = _q_down(
            acc, zacc, h_ptr, stride_h, T, magic, a0, a1, a2, a_s, a_z, a_n, a_col, s, o0, d,
            BITS_A, E_A, PLANES_A, GROUP, BLOCK_T, BLOCK_J, BLOCK_O, SPLIT, STAGES,
            y_ptr.dtype.element_ty, EVEN, HALF,
        )  # fmt: skip
    if BITS_B > 0:
        acc, zacc = _q_down(
            acc, zacc, h_ptr, stride_h, T, magic, b0, b1, b2, b_s, b_z, b_n, b_col, s, o0, d,
            BITS_B, E_B, PLANES_B, GROUP, BLOCK_T, BLOCK_J, BLOCK_O, SPLIT, STAGES,
            y_ptr.dtype.element_ty, EVEN, HALF,
        )  # fmt: skip
    if BITS_C > 0:
        acc, zacc = _q_down(
            acc, zacc, h_ptr, stride_h, T, magic, c0, c1, c2, c_s, c_z, c_n, c_col, s, o0, d,
            BITS_C, E_C, PLANES_C, GROUP, BLOCK_T, BLOCK_J, BLOCK_O, SPLIT, STAGES,
            y_ptr.dtype.element_ty, EVEN, HALF,
        )  # fmt: skip
    if BLOCK_T == 1:
        out = (tl.sum(acc, axis=0) + tl.sum(zacc, axis=0))[None, :]
    else:
        out = acc + tl.sum(zacc, axis=1)[:, None]
    mask = t_ok[:, None] & o_ok[None, :]
    y_out = y_ptr + t[:, None] * stride_y + o[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        if ACCUMULATE:
            out += tl.load(y_out, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_out, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws = ws_ptr + t[:, None] * d + o[None, :]
        tl.store(ws + s * T * d, out, mask=mask)
        arrived = _arrive(cnt_ptr + pid)
        if arrived == SPLIT - 1:
            total = _gather(ws, mask, T * d, SPLIT)
            if HAS_BIAS:
                total += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            if ACCUMULATE:
                total += tl.load(y_out, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_out, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + pid, 0)


# ------------------------------------------------------------------------- prefill dequantisation


@triton.jit
def _dequant_rows_kernel(
    magic,
    p0,
    p1,
    p2,
    s_ptr,
    z_ptr,
    out_ptr,
    row0,
    rows,
    out_row0,
    d,
    BITS: tl.constexpr,
    E: tl.constexpr,
    PLANES: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_MAJOR: tl.constexpr,
    n_rows_total,
    BLOCK_R: tl.constexpr,
):
    """out[out_row0 + r, g*GROUP : (g+1)*GROUP] = dequant(row row0 + r, group g), r < rows.
    Row-major units (first projection) or group-major (down, GROUP_MAJOR)."""
    UPG: tl.constexpr = GROUP // E
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    r_ok = r < rows
    src = row0 + r
    ui = tl.arange(0, UPG)
    if GROUP_MAJOR:
        offs = (g.to(tl.int64) * n_rows_total + src[:, None]) * UPG + ui[None, :]
        meta = g * n_rows_total + src
    else:
        offs = src.to(tl.int64)[:, None] * (d // E) + g * UPG + ui[None, :]
        meta = src * (d // GROUP) + g
    u0, u1, u2 = _load_units(p0, p1, p2, offs, r_ok[:, None], PLANES)
    big = tl.load(s_ptr + meta, mask=r_ok, other=0.0).to(tl.float32) * (1 << BITS)
    zero = tl.load(z_ptr + meta, mask=r_ok, other=0.0).to(tl.float32) - big
    w = _unpack(u0, u1, u2, magic, BITS, E) * big[:, None] + zero[:, None]
    k = g * GROUP + tl.arange(0, GROUP)
    dst = out_ptr + (out_row0 + r).to(tl.int64)[:, None] * d + k[None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


# ------------------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class Segment:
    """One quantized segment as the kernels see it (tensors in qlayout's kernel layout)."""

    bits: int
    per_unit: int
    first: tuple[Tensor, ...]  # planes [rows, d/E]
    first_scales: Tensor
    first_zeros: Tensor
    down: tuple[Tensor, ...]  # planes [d/GROUP, n, GROUP/E]
    down_scales: Tensor
    down_zeros: Tensor
    neurons: int
    column: int  # first hidden column of this segment


@dataclass
class Tiles:
    """Launch meta-parameters of one stage and token mode (bench/ffn.py --sweep picks them)."""

    block_n: int
    block_k: int
    split: int
    stages: int = 3
    warps: int = 4
    group_dot: int = 0  # first stage: scale per group after the dot (_q_row_dot_groups); 2: with
    # 4-bit codes unpacked in 16 bits (set for the 1-token mode, the GEMV runs as a 16-row tile);
    # last stage, tiles: 2 unpacks 4-bit codes in 16 bits too.
    maxnreg: int = 0  # register cap per thread (0: none): more warps per SM, perhaps spills


# (stage, mode): "one" = 1 token (CUDA-core GEMV, BLOCK_T 1), "tile" = 2-16 tokens (tensor
# cores, BLOCK_T 16). first: BLOCK_N neurons x BLOCK_K columns; last: BLOCK_J neurons per step
# (block_n) x BLOCK_O outputs (block_k, clamped to the group). Chosen by bench/ffn.py --sweep on
# the H200 (bench/results/NOTES-h200.md); FFSPLIT_QTILES="stage/mode=bn,bk,split,stages,warps;..."
# overrides them (sweeps, tests).
TILES: dict[tuple[str, str], Tiles] = {  # call 3's picks for int4 light + bf16 heavy, Llama-2-7B
    ("first", "one"): Tiles(16, 256, 2, 4, 4, maxnreg=96),
    ("first", "tile"): Tiles(32, 64, 8, 3, 4, maxnreg=96),
    ("last", "one"): Tiles(128, 64, 8, 3, 8, maxnreg=96),
    ("last", "tile"): Tiles(64, 64, 8, 3, 4, maxnreg=128),
}
# The interpreter (tests on CPU): small tiles, an odd split (uneven and empty slices).
INTERPRETER_TILES: dict[tuple[str, str], Tiles] = {
    ("first", "one"): Tiles(16, 64, 3, 1, 4),
    ("first", "tile"): Tiles(16, 64, 3, 1, 4),
    ("last", "one"): Tiles(16, 32, 3, 1, 4),
    ("last", "tile"): Tiles(16, 32, 3, 1, 4),
}
# What FFSPLIT_QTUNE=1 tries on the first call per (stage, mode, d, group, gated, narrowest
# width) and keeps (bench/ffn.py --quant sets it; the table above is what it found on the H200).
CANDIDATES: dict[tuple[str, str], list[Tiles]] = {
    # call 1 on the H200 (NOTES-h200.md): 1.0-1.3 TB/s with 230-255 registers a thread, i.e. 2
    # warps per scheduler: latency-bound; call 2: the small, register-capped tiles won.
    ("first", "one"): [
        Tiles(16, 256, 2, 3, 4, maxnreg=96),
        Tiles(16, 256, 4, 3, 4, maxnreg=80),
        Tiles(16, 128, 4, 3, 4, maxnreg=64),
        Tiles(8, 256, 2, 3, 2, maxnreg=64),
        Tiles(16, 512, 2, 3, 8, maxnreg=64),
        Tiles(16, 256, 2, 4, 4, maxnreg=96),
        Tiles(32, 128, 4, 3, 4, maxnreg=96),
        # the 16-row tensor-core tile at one token (4-bit codes unpacked in 16 bits: 4.5
        # instructions a code against 6.4 for the GEMV, scripts/sass_count.py)
        Tiles(64, 128, 4, 2, 4, 2, maxnreg=128),
        Tiles(64, 64, 8, 3, 4, 2, maxnreg=128),
    ],
    ("first", "tile"): [
        Tiles(16, 128, 4, 3, 4, 0, maxnreg=96),
        Tiles(16, 128, 8, 3, 4, 0, maxnreg=80),
        Tiles(32, 128, 4, 3, 4, 1, maxnreg=96),
        Tiles(64, 128, 4, 2, 4, 1, maxnreg=128),
        Tiles(16, 256, 4, 3, 4, 0, maxnreg=96),
        Tiles(32, 64, 8, 3, 4, 0, maxnreg=96),
        Tiles(64, 128, 4, 2, 4, 2, maxnreg=128),  # 4-bit codes unpacked in 16 bits
        Tiles(64, 64, 8, 3, 4, 2, maxnreg=128),
        Tiles(128, 128, 4, 2, 4, 2, maxnreg=168),
    ],
    ("last", "one"): [
        Tiles(32, 64, 8, 3, 4, maxnreg=64),
        Tiles(32, 64, 16, 3, 4, maxnreg=64),
        Tiles(16, 64, 16, 3, 4, maxnreg=64),
        Tiles(64, 64, 8, 3, 4, maxnreg=96),
        Tiles(32, 64, 8, 4, 2, maxnreg=64),
        Tiles(128, 64, 8, 3, 8, maxnreg=96),
    ],
    ("last", "tile"): [
        Tiles(64, 64, 8, 3, 4, maxnreg=128),
        Tiles(32, 64, 16, 3, 4, maxnreg=96),
        Tiles(64, 64, 16, 3, 4, maxnreg=128),
        Tiles(32, 64, 8, 3, 4, maxnreg=96),
        Tiles(64, 64, 8, 3, 4, 2, maxnreg=128),  # 4-bit codes unpacked in 16 bits
        Tiles(32, 64, 16, 3, 4, 2, maxnreg=96),
        Tiles(64, 64, 16, 3, 4, 2, maxnreg=128),
    ],
}
_chosen: dict[tuple, Tiles] = {}
tuning_log: list[dict] = []  # every tuning: key, milliseconds per candidate, the one kept
_COUNTER_SLOTS = 1 << 15
_counters: dict[tuple[torch.device, str], Tensor] = {}


def _choose(stage: str, tokens: int, key: tuple, run: object) -> Tiles:
    """The tiles for this launch: FFSPLIT_QTILES or the table, or with FFSPLIT_QTUNE=1 the
    fastest candidate, timed once per key (never inside a CUDA-graph capture)."""
    fixed = tiles(stage, tokens)
    tune = os.environ.get("FFSPLIT_QTUNE", "0") == "1" and not os.environ.get("FFSPLIT_QTILES")
    if not tune or interpreting() or torch.cuda.is_current_stream_capturing():
        return fixed
    mode = "one" if tokens == 1 else "tile"
    full = (stage, mode, *key)
    if full not in _chosen:
        times = []
        for cfg in CANDIDATES[stage, mode]:
            try:
                ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=25)
            except Exception as exc:  # noqa: BLE001 - a tile that fails to compile is skipped
                ms = float("inf")
                tuning_log.append({"key": str(full), "tiles": str(cfg), "error": str(exc)[:200]})
            times.append(ms)
        best = min(range(len(times)), key=times.__getitem__)
        _chosen[full] = CANDIDATES[stage, mode][best]
        tuning_log.append(
            {
                "key": str(full),
                "ms": {str(c): t for c, t in zip(CANDIDATES[stage, mode], times, strict=True)},
                "chosen": str(_chosen[full]),
            }
        )
    return _chosen[full]


def tiles(stage: str, tokens: int) -> Tiles:
    mode = "one" if tokens == 1 else "tile"
    table = INTERPRETER_TILES if interpreting() else TILES
    spec = os.environ.get("FFSPLIT_QTILES", "")
    for item in filter(None, spec.split(";")):
        key, _, values = item.partition("=")
        if key.strip() == f"{stage}/{mode}":
            numbers = [int(v) for v in values.split(",")]
            return Tiles(*numbers)
    return table[stage, mode]


def _counters_for(device: torch.device, stage: str, blocks: int) -> Tensor:
    """Arrival counters of split-K launches: one zeroed int32 set per device and stage, left zero
    by every launch (the last slice of a block resets its counter): no memset, CUDA-graph safe.
    Launches of one stage must not run concurrently on two streams of one device."""
    if blocks > _COUNTER_SLOTS:
        raise FFSplitError(f"ffsplit.kernels.qffn.{stage}: {blocks} blocks exceed the counters")
    key = (device, stage)
    if key not in _counters:
        _counters[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _counters[key]


def _segment_args(segments: list[Segment], stage: str, dummy: Tensor) -> tuple[list, dict]:
    """Pointer/size arguments of the three segment slots and their constexprs."""
    args: list = []
    meta: dict[str, int] = {}
    for i, name in enumerate("ABC"):
        if i < len(segments):
            seg = segments[i]
            planes = seg.first if stage == "first" else seg.down
            scales = seg.first_scales if stage == "first" else seg.down_scales
            zeros = seg.first_zeros if stage == "first" else seg.down_zeros
            padded = [*planes, *(planes[0],) * (3 - len(planes))]
            args += [*padded, scales, zeros, seg.neurons, seg.column]
            meta.update({f"BITS_{name}": seg.bits, f"E_{name}": seg.per_unit})
            meta[f"PLANES_{name}"] = len(planes)
        else:
            args += [dummy, dummy, dummy, dummy, dummy, 0, 0]
            meta.update({f"BITS_{name}": 0, f"E_{name}": 8, f"PLANES_{name}": 1})
    return args, meta


def first(
    x: Tensor,
    w_dense: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    *,
    gated: bool,
    act: str,
    m_total: int,
    group: int,
) -> Tensor:
    """hidden fp32 [T, m_total] for x [T, d], T <= 16: dense rows [gate; up] of w_dense
    ([2 m_dense, d], or [m_dense, d] not gated) at columns [0, m_dense), each segment at its
    column. bias: [2, m_total] gate/up (or [m_total]) covering every neuron, or None."""
    tokens, d = x.shape
    hidden = torch.empty(tokens, m_total, device=x.device, dtype=torch.float32)
    for i, chunk in enumerate(_chunks(segments)):
        dense = w_dense if i == 0 else None  # the dense rows go with the first launch

        def run(cfg: Tiles, chunk: list[Segment] = chunk, dense: Tensor | None = dense) -> None:
            _launch_first(x, dense, bias, chunk, hidden, cfg, gated, act, m_total, group)

        key = (d, group, gated, min(s.bits for s in chunk), len(chunk), dense is not None)
        run(_choose("first", tokens, key, run))
    return hidden


def _chunks(segments: list[Segment]) -> list[list[Segment]]:
    """The segments in launches of at most MAX_SEGMENTS (see there)."""
    if not segments:
        raise FFSplitError("ffsplit.kernels.qffn: an FFN without quantized segments")
    return [segments[i : i + MAX_SEGMENTS] for i in range(0, len(segments), MAX_SEGMENTS)]


def _launch_first(
    x: Tensor,
    w_dense: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    hidden: Tensor,
    cfg: Tiles,
    gated: bool,
    act: str,
    m_total: int,
    group: int,
) -> None:
    tokens, d = x.shape
    block_k = min(cfg.block_k, d & -d)  # a power of two dividing d: every step is whole
    m_dense = 0 if w_dense is None else w_dense.shape[0] // (2 if gated else 1)
    blocks = triton.cdiv(m_dense, cfg.block_n) + sum(
        triton.cdiv(s.neurons, cfg.block_n) for s in segments
    )
    workspace = torch.empty(
        max(cfg.split * 2 * tokens * m_total, 1) if cfg.split > 1 else 1,
        device=x.device,
        dtype=torch.float32,
    )
    counters = _counters_for(x.device, "qfirst", blocks)
    dummy = x if w_dense is None else w_dense
    seg_args, seg_meta = _segment_args(segments, "first", dummy)
    _qfirst_kernel[(max(blocks, 1), cfg.split)](
        x,
        x.stride(0),
        tokens,
        d,
        MAGIC,
        dummy,
        m_dense,
        bias if bias is not None else dummy,
        m_total,
        hidden,
        hidden.stride(0),
        workspace,
        counters,
        *seg_args,
        GATED=gated,
        ACT=act,
        HAS_BIAS=bias is not None,
        GROUP=group,
        BLOCK_T=1 if tokens == 1 and not cfg.group_dot else MAX_TOKENS,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        SPLIT=cfg.split,
        STAGES=cfg.stages,
        GROUP_DOT=cfg.group_dot,
        EVEN=all(n % cfg.block_n == 0 for n in [m_dense, *(s.neurons for s in segments)]),
        num_warps=cfg.warps,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreting() else {}),
        **seg_meta,
    )


def last(
    hidden: Tensor,
    w_dense_t: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    out_dtype: torch.dtype,
    *,
    d: int,
    group: int,
) -> Tensor:
    """y [T, d] = hidden @ [W_down_dense^T; segments' down]^T... i.e. sum over segments of
    hidden[:, seg columns] @ W_seg (+ bias). w_dense_t: dense down rows [m_dense, d]."""
    tokens = hidden.shape[0]
    y = torch.empty(tokens, d, device=hidden.device, dtype=out_dtype)
    for i, chunk in enumerate(_chunks(segments)):
        dense, b = (w_dense_t, bias) if i == 0 else (None, None)  # later launches add to y

        def run(
            cfg: Tiles, chunk: list[Segment] = chunk, dense: Tensor | None = dense,
            b: Tensor | None = b, out: Tensor = y, accumulate: bool = i > 0,
        ) -> None:  # fmt: skip
            _launch_last(hidden, dense, b, chunk, out, cfg, d, group, accumulate)

        # the tuner runs a launch many times: an accumulating one times on a scratch output
        trial = partial(run, out=torch.empty_like(y)) if i > 0 else run
        key = (d, group, dense is not None, min(s.bits for s in chunk), len(chunk), i > 0)
        run(_choose("last", tokens, key, trial))
    return y


def _launch_last(
    hidden: Tensor,
    w_dense_t: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    y: Tensor,
    cfg: Tiles,
    d: int,
    group: int,
    accumulate: bool = False,
) -> None:
    tokens = hidden.shape[0]
    block_o = min(cfg.block_k, group)
    blocks = triton.cdiv(d, block_o)
    m_dense = 0 if w_dense_t is None else w_dense_t.shape[0]
    workspace = torch.empty(
        cfg.split * tokens * d if cfg.split > 1 else 1, device=hidden.device, dtype=torch.float32
    )
    counters = _counters_for(hidden.device, "qlast", blocks)
    dummy = hidden if w_dense_t is None else w_dense_t
    seg_args, seg_meta = _segment_args(segments, "last", dummy)
    _qlast_kernel[(blocks, cfg.split)](
        hidden,
        hidden.stride(0),
        tokens,
        d,
        MAGIC,
        y,
        y.stride(0),
        bias if bias is not None else dummy,
        dummy,
        m_dense,
        workspace,
        counters,
        *seg_args,
        HAS_BIAS=bias is not None,
        HAS_DENSE=w_dense_t is not None,
        GROUP=group,
        BLOCK_T=1 if tokens == 1 else MAX_TOKENS,
        BLOCK_J=cfg.block_n,
        BLOCK_O=block_o,
        SPLIT=cfg.split,
        STAGES=cfg.stages,
        HALF=cfg.group_dot == 2,
        ACCUMULATE=accumulate,
        EVEN=all(n % cfg.block_n == 0 for n in [m_dense, *(s.neurons for s in segments)]),
        num_warps=cfg.warps,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreting() else {}),
        **seg_meta,
    )


def dequantize_into(
    out: Tensor, seg: Segment, stage: str, row0: int, rows: int, out_row0: int, group: int
) -> None:
    """out[out_row0 : out_row0 + rows] = dequantised rows [row0, row0 + rows) of a segment's
    first-projection rows (stage "first") or down rows (stage "down"); out [*, d]."""
    d = out.shape[1]
    planes = seg.first if stage == "first" else seg.down
    padded = [*planes, *(planes[0],) * (3 - len(planes))]
    scales = seg.first_scales if stage == "first" else seg.down_scales
    zeros = seg.first_zeros if stage == "first" else seg.down_zeros
    total = seg.neurons if stage == "down" else planes[0].shape[0]
    block_r = 16 if interpreting() else 32
    _dequant_rows_kernel[(triton.cdiv(rows, block_r), d // group)](
        MAGIC,
        *padded,
        scales,
        zeros,
        out,
        row0,
        rows,
        out_row0,
        d,
        BITS=seg.bits,
        E=seg.per_unit,
        PLANES=len(planes),
        GROUP=group,
        GROUP_MAJOR=stage == "down",
        n_rows_total=total,
        BLOCK_R=block_r,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------- prefill

# Light neurons per GEMM in prefill: their gate/up rows dequantised into a reused scratch buffer
# of 2 * CHUNK * d values. Eager prefill pays ~30 us of Python per Triton launch: with 1024 a
# 7B layer took 10 chunks and the model's prefill doubled (call 2, NOTES-h200.md); 4096 is 3
# chunks. FFSPLIT_PREFILL_CHUNK overrides.
PREFILL_CHUNK = 4096
_scratch: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}


def _scratch_for(device: torch.device, dtype: torch.dtype, name: str, numel: int) -> Tensor:
    """One reused buffer per device, dtype and use (shared by every layer): the dequantised
    weights of the prefill path never stay resident."""
    key = (device, dtype, name)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch[key] = torch.empty(numel, device=device, dtype=dtype)
    return buf[:numel]


def prefill_first(
    x: Tensor,
    w_dense: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    *,
    gated: bool,
    act_fn: object,
    m_total: int,
    group: int,
) -> Tensor:
    """hidden [T, m_total] (x's dtype) for any T through cuBLAS: dense rows as one GEMM, each
    quantised segment in chunks dequantised into an L2-sized scratch buffer."""
    tokens, d = x.shape
    hidden = x.new_empty(tokens, m_total)
    chunk = int(os.environ.get("FFSPLIT_PREFILL_CHUNK", PREFILL_CHUNK))
    per = 2 if gated else 1
    m_dense = 0 if w_dense is None else w_dense.shape[0] // per
    if m_dense:
        y = torch.nn.functional.linear(x, w_dense)
        _activate_into(hidden, 0, y, bias, m_dense, 0, m_total, gated, act_fn)
    for seg in segments:
        n = seg.neurons
        step = min(chunk, n)
        scratch = _scratch_for(x.device, x.dtype, "first", per * step * d).view(per * step, d)
        for c0 in range(0, n, step):
            rows = min(step, n - c0)
            dequantize_into(scratch, seg, "first", c0, rows, 0, group)
            if gated:
                dequantize_into(scratch, seg, "first", n + c0, rows, rows, group)
            y = torch.nn.functional.linear(x, scratch[: per * rows])
            _activate_into(
                hidden, seg.column + c0, y, bias, rows, seg.column + c0, m_total, gated, act_fn
            )
    return hidden


def _activate_into(
    hidden: Tensor,
    col: int,
    y: Tensor,
    bias: Tensor | None,
    rows: int,
    bias_col: int,
    m_total: int,
    gated: bool,
    act_fn: object,
) -> None:
    """hidden[:, col:col+rows] = act(g + b_g) * (u + b_u) from y = [g | u] (or act(u + b_u))."""
    up = y[:, rows : 2 * rows] if gated else y
    if bias is not None:
        flat = bias.reshape(-1)
        u_bias = (
            flat[m_total + bias_col : m_total + bias_col + rows]
            if gated
            else flat[bias_col : bias_col + rows]
        )
        up = up + u_bias
    out = hidden[:, col : col + rows]
    if gated:
        gate = y[:, :rows]
        if bias is not None:
            gate = gate + bias.reshape(-1)[bias_col : bias_col + rows]
        torch.mul(act_fn(gate), up, out=out)
    else:
        out.copy_(act_fn(up))


def prefill_last(
    hidden: Tensor,
    w_dense_t: Tensor | None,
    bias: Tensor | None,
    segments: list[Segment],
    *,
    d: int,
    group: int,
) -> Tensor:
    """y [T, d] for any T: dense down rows as one GEMM, each segment's down rows dequantised
    whole into a scratch buffer and added by one more GEMM (addmm)."""
    tokens = hidden.shape[0]
    m_dense = 0 if w_dense_t is None else w_dense_t.shape[0]
    if m_dense:
        y = hidden[:, :m_dense] @ w_dense_t
        if bias is not None:
            y += bias
    else:
        y = hidden.new_zeros(tokens, d) if bias is None else bias.expand(tokens, d).clone()
    for seg in segments:
        scratch = _scratch_for(hidden.device, hidden.dtype, "down", seg.neurons * d)
        w = scratch.view(seg.neurons, d)
        dequantize_into(w, seg, "down", 0, seg.neurons, 0, group)
        y.addmm_(hidden[:, seg.column : seg.column + seg.neurons], w)
    return y


# ------------------------------------------------------------------------------------ custom ops
# Opaque ops: torch.compile traces around them, CUDA graphs capture them like any op. Segments
# travel as a flat tensor list + int list (segment_args / segments_from).

_PER_SEGMENT_INTS = 6  # bits, per_unit, first planes, neurons, column, down planes


def segment_args(segments: list[Segment]) -> tuple[list[Tensor], list[int]]:
    tensors: list[Tensor] = []
    ints: list[int] = [len(segments)]
    for seg in segments:
        tensors += [*seg.first, seg.first_scales, seg.first_zeros]
        tensors += [*seg.down, seg.down_scales, seg.down_zeros]
        ints += [seg.bits, seg.per_unit, len(seg.first), seg.neurons, seg.column, len(seg.down)]
    return tensors, ints


def segments_from(tensors: list[Tensor], ints: list[int]) -> list[Segment]:
    out = []
    pos = 0
    for i in range(ints[0]):
        bits, per_unit, n_first, neurons, column, n_down = ints[
            1 + i * _PER_SEGMENT_INTS : 1 + (i + 1) * _PER_SEGMENT_INTS
        ]
        first_planes = tuple(tensors[pos : pos + n_first])
        pos += n_first
        f_scales, f_zeros = tensors[pos], tensors[pos + 1]
        pos += 2
        down_planes = tuple(tensors[pos : pos + n_down])
        pos += n_down
        d_scales, d_zeros = tensors[pos], tensors[pos + 1]
        pos += 2
        out.append(
            Segment(
                bits,
                per_unit,
                first_planes,
                f_scales,
                f_zeros,
                down_planes,
                d_scales,
                d_zeros,
                neurons,
                column,
            )
        )
    return out


@torch.library.custom_op("ffsplit::qffn_first", mutates_args=())
def qffn_first(
    x: Tensor,
    w_dense: Tensor | None,
    bias: Tensor | None,
    tensors: list[Tensor],
    ints: list[int],
    gated: bool,
    act: str,
    m_total: int,
    group: int,
) -> Tensor:
    """Decode stage 1: x [T <= 16, d] -> hidden fp32 [T, m_total]."""
    return first(
        x,
        w_dense,
        bias,
        segments_from(tensors, ints),
        gated=gated,
        act=act,
        m_total=m_total,
        group=group,
    )


@qffn_first.register_fake
def _(x, w_dense, bias, tensors, ints, gated, act, m_total, group):
    return x.new_empty(x.shape[0], m_total, dtype=torch.float32)


@torch.library.custom_op("ffsplit::qffn_last", mutates_args=())
def qffn_last(
    hidden: Tensor,
    w_dense_t: Tensor | None,
    bias: Tensor | None,
    tensors: list[Tensor],
    ints: list[int],
    d: int,
    group: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Decode stage 2: hidden fp32 [T <= 16, m_total] -> y [T, d] in out_dtype."""
    return last(hidden, w_dense_t, bias, segments_from(tensors, ints), out_dtype, d=d, group=group)


@qffn_last.register_fake
def _(hidden, w_dense_t, bias, tensors, ints, d, group, out_dtype):
    return hidden.new_empty(hidden.shape[0], d, dtype=out_dtype)


_ACT_FNS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
    "relu": torch.nn.functional.relu,
}


@torch.library.custom_op("ffsplit::qffn_prefill_first", mutates_args=())
def qffn_prefill_first(
    x: Tensor,
    w_dense: Tensor | None,
    bias: Tensor | None,
    tensors: list[Tensor],
    ints: list[int],
    gated: bool,
    act: str,
    m_total: int,
    group: int,
) -> Tensor:
    """Prefill stage 1 (any T): hidden [T, m_total] in x's dtype."""
    return prefill_first(
        x,
        w_dense,
        bias,
        segments_from(tensors, ints),
        gated=gated,
        act_fn=_ACT_FNS[act],
        m_total=m_total,
        group=group,
    )


@qffn_prefill_first.register_fake
def _(x, w_dense, bias, tensors, ints, gated, act, m_total, group):
    return x.new_empty(x.shape[0], m_total)


@torch.library.custom_op("ffsplit::qffn_prefill_last", mutates_args=())
def qffn_prefill_last(
    hidden: Tensor,
    w_dense_t: Tensor | None,
    bias: Tensor | None,
    tensors: list[Tensor],
    ints: list[int],
    d: int,
    group: int,
) -> Tensor:
    """Prefill stage 2 (any T): y [T, d] in hidden's dtype."""
    return prefill_last(hidden, w_dense_t, bias, segments_from(tensors, ints), d=d, group=group)


@qffn_prefill_last.register_fake
def _(hidden, w_dense_t, bias, tensors, ints, d, group):
    return hidden.new_empty(hidden.shape[0], d)
