"""Split-FFN decode kernels: three launches per FFN, weights read once, intermediates on chip or L2.

At 1-16 tokens an FFN is bound by reading its weights (method.md, "Known engineering facts"), so
every kernel here streams one weight matrix once and keeps the small activations in registers:

1. ``first``: one launch over the stacked first-projection rows ``W1 = [gate_H; up_H; B_gate; B_up]``.
   Heavy programs compute gate and up of the same neurons and write ``act(g) * u`` (the activation
   is fused); low-rank programs write the inner vectors ``z = x B^T``; int4 programs dequantize the
   light gate/up rows in registers and write ``act(g) * u`` of the light neurons. One extra program
   zeroes the columns the chain accumulates into (so no memset launch is needed).
2. ``lowrank_chain``: per block of light neurons ``h_L = act(A_g z_g) * (A_u z_u)`` stays in
   registers and is projected at once by ``B_down``: partial ``h_L B_down^T`` sums are atomically
   added into the hidden buffer (fp32), so ``[T, m_L]`` never reaches memory.
3. ``last``: ``y = hidden @ [W_down_H | A_down]^T (+ int4 light columns) + bias``.

Layouts are chosen at fuse time (ffsplit/split/fused.py) for these kernels: every weight tile is
read along its contiguous dimension; int4 codes are packed "half-split": within each block of
``2 * half`` codes along the reduction axis, byte ``i`` holds code ``i`` (low nibble) and code
``i + half`` (high nibble), so the two halves dequantize without any register shuffle.

Tokens: 2-16 tokens use 16-row tensor-core tiles (rows beyond T masked); 1 token may also use
GEMV tiles (``BLOCK_T`` 1: CUDA-core multiply-adds, loads pipelined with ``tl.range``), which the
16-row tile wastes 15/16 of. Split-K (``SPLIT`` > 1, ``first`` and ``last``): the small first/last
matrices have too few row blocks to fill 132 SMs, so each block's reduction is cut in SPLIT
slices run by separate programs; the partial sums go to an fp32 workspace and the last slice to
arrive (per-block counter, acquire-release atomic) adds them and applies the epilogue, then
resets the counter (counters are per device and stage, zero between launches: no memset, no host
sync, CUDA-graph safe). Launch wrappers autotune a few tiles per weight shape and token mode
(first call only: warm up before capturing a CUDA graph). Measurements: bench/results/NOTES-h200.md.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.kernels import interpreting

BLOCK_T = 16  # token rows per tile: tl.dot needs 16; decode sizes are 1..16 tokens
MAX_TOKENS = BLOCK_T
QUANT_BLOCK = 128  # neurons per half-split block of the int4 down layout (see pack_halves)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "identity")
LIGHT_KINDS = {"none": 0, "lowrank": 1, "quant": 2}


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == "silu":
        return x * tl.sigmoid(x)
    elif ACT == "gelu_tanh":
        # 0.5 x (1 + tanh(u)) == x * sigmoid(2u)
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == "relu":
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _row_dot(
    acc,
    x_ptr,
    stride_x,
    T,
    w_ptr,
    rows,
    rows_ok,
    k_lo,
    k_hi,
    k_stride,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """acc[t, n] += sum_k x[t, k] * w[rows[n], k] over k_lo <= k < k_hi (w row stride k_stride).

    A 16-row tile goes through tensor cores (Triton pipelines loads that feed a dot by itself);
    one token (BLOCK_T == 1) multiplies on CUDA cores into a [BLOCK_N, BLOCK_K] accumulator reduced
    once after the loop, its loads pipelined STAGES deep (Triton pipelines loads that feed no dot
    only when the loop asks for it)."""
    t = tl.arange(0, BLOCK_T)
    w_rows = w_ptr + rows[:, None] * k_stride
    if BLOCK_T == 1:
        wide = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            x = tl.load(x_ptr + k[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(
                w_rows + k[None, :],
                mask=rows_ok[:, None] & k_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            wide += w.to(tl.float32) * x.to(tl.float32)
        acc += tl.sum(wide, axis=1)[None, :]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            x = tl.load(
                x_ptr + t[:, None] * stride_x + k[None, :],
                mask=(t[:, None] < T) & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_rows + k[None, :],
                mask=rows_ok[:, None] & k_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            acc += tl.dot(x.to(w.dtype), tl.trans(w))
    return acc


@triton.jit
def _q4_row_dot(
    acc,
    x_ptr,
    stride_x,
    T,
    q_ptr,
    s_ptr,
    z_ptr,
    rows,
    rows_ok,
    g_lo,
    g_hi,
    d,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    STAGES: tl.constexpr,
):
    """acc[t, n] += x[t, :] . dequant(q[rows[n], :]) over the groups g_lo <= g < g_hi: int4
    rows, groups of GROUP along d, half-split packed within each group (one group per step, one
    scale per row per step: a [BLOCK_N] vector, not a per-byte gather, which ran 3x slower)."""
    HALF: tl.constexpr = GROUP // 2
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    c = tl.arange(0, HALF)
    n_groups = d // GROUP
    if BLOCK_T == 1:
        wide = tl.zeros((BLOCK_N, HALF), tl.float32)
    for g in tl.range(g_lo, g_hi, num_stages=STAGES):
        k = g * GROUP + c
        x_lo = tl.load(x_ptr + t[:, None] * stride_x + k[None, :], mask=t_ok[:, None], other=0.0)
        x_hi = tl.load(
            x_ptr + t[:, None] * stride_x + (k + HALF)[None, :], mask=t_ok[:, None], other=0.0
        )
        b = tl.load(
            q_ptr + rows[:, None] * (d // 2) + (g * HALF + c)[None, :],
            mask=rows_ok[:, None],
            other=0,
            eviction_policy="evict_first",
        )
        s = tl.load(s_ptr + rows * n_groups + g, mask=rows_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * n_groups + g, mask=rows_ok, other=0.0).to(tl.float32)
        lo = (b & 15).to(tl.float32) * s[:, None] + z[:, None]
        hi = (b >> 4).to(tl.float32) * s[:, None] + z[:, None]
        if BLOCK_T == 1:
            wide += lo * x_lo.to(tl.float32) + hi * x_hi.to(tl.float32)
        else:
            acc += tl.dot(x_lo, tl.trans(lo.to(x_lo.dtype)))
            acc += tl.dot(x_hi, tl.trans(hi.to(x_lo.dtype)))
    if BLOCK_T == 1:
        acc += tl.sum(wide, axis=1)[None, :]
    return acc


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Under programmatic dependent launch (sm_90+): wait until the previous kernel's writes are
    visible, then let the next kernel launch, so its programs are resident (prefetching their
    weights) while this one drains instead of starting after it."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_rows(w_ptr, rows, rows_ok, k_lo, k_hi, k_stride, LINES: tl.constexpr):
    """Ask L2 for the first LINES 128-byte lines (64 bf16/fp16 values) of each weight row's slice
    [k_lo, k_hi). Issued before _pdl_enter's wait: weights are never written by an earlier
    kernel, and the loop that follows finds its first tiles in L2 instead of waiting on HBM."""
    j = k_lo + tl.arange(0, LINES) * 64
    ok = rows_ok[:, None] & (j < k_hi)[None, :]
    offs = tl.where(ok, rows[:, None] * k_stride + j[None, :], 0)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // $0",
        "=r,l",
        [w_ptr + offs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _k_slice(k_len, s, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """[lo, hi) of the reduction that slice s of SPLIT walks: whole BLOCK_K tiles, the last
    slices possibly empty (lo >= hi) when there are fewer tiles than slices."""
    per = tl.cdiv(tl.cdiv(k_len, BLOCK_K), SPLIT) * BLOCK_K
    lo = s * per
    hi = tl.minimum(lo + per, k_len)
    return lo, hi


@triton.jit
def _arrive(counter):
    """Count this program's slice in once all its threads wrote their partial sums (a barrier,
    then one acquire-release atomic: CUTLASS's split-K semaphore). Returns how many slices of
    the block arrived before it: SPLIT - 1 means this program is the last and reduces."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _gather(ptrs, mask, slice_stride, SPLIT: tl.constexpr):
    """Sum of the SPLIT partial tiles at ptrs + i * slice_stride, read from L2 (.cg): other
    programs wrote them, and this SM's L1 must not answer."""
    total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for i in tl.static_range(1, SPLIT):
        total += tl.load(ptrs + i * slice_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _act_store(
    acc_g,
    acc_u,
    b_ptr,
    g_rows,
    u_rows,
    rows_ok,
    out_ptr,
    stride_out,
    cols,
    t,
    t_ok,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out[t, cols] = act(g + bias_g) * (u + bias_u), or act(u + bias_u) when not gated."""
    if HAS_BIAS:
        acc_u += tl.load(b_ptr + u_rows, mask=rows_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BIAS:
            acc_g += tl.load(b_ptr + g_rows, mask=rows_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_u, ACT)
    tl.store(
        out_ptr + t[:, None] * stride_out + cols[None, :],
        h,
        mask=t_ok[:, None] & rows_ok[None, :],
    )


@triton.jit
def _first_kernel(
    x_ptr,
    stride_x,
    T,
    d,
    w_ptr,
    b_ptr,
    h_ptr,
    stride_h,
    z_ptr,
    stride_z,
    q_ptr,
    qs_ptr,
    qz_ptr,
    qb_ptr,
    ws_ptr,
    ws_cols,
    cnt_ptr,
    m_heavy,
    r_first,
    m_light,
    zero_offset,
    zero_cols,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    LIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_QBIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Its predecessor (a norm) never triggers early: nothing to prefetch ahead, only wait/trigger.
    _pdl_enter(PDL)
    # grid: (row blocks, SPLIT slices of d). With SPLIT > 1 every slice writes its partial sums
    # into the workspace [SPLIT, 2 (gate, up), T, ws_cols] and the last slice of a block to
    # arrive adds them up and applies the epilogue (bias, activation); it resets the counter.
    pid = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    zeros = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    n_heavy_prog = tl.cdiv(m_heavy, BLOCK_N)
    n_light_prog = tl.cdiv(r_first, BLOCK_N)
    plane = T * ws_cols  # floats per (slice, gate/up) plane of the workspace
    if pid < n_heavy_prog:
        # heavy neurons: gate and up rows of the same neurons, activation fused
        k_lo, k_hi = _k_slice(d, s, SPLIT, BLOCK_K)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < m_heavy
        if GATED:
            up_rows = n + m_heavy
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
        if SPLIT == 1:
            _act_store(
                acc_g,
                acc_u,
                b_ptr,
                n,
                up_rows,
                n_ok,
                h_ptr,
                stride_h,
                n,
                t,
                t_ok,
                GATED,
                ACT,
                HAS_BIAS,
            )
        else:
            mask = t_ok[:, None] & n_ok[None, :]
            ws = ws_ptr + t[:, None] * ws_cols + n[None, :]
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
                    n,
                    up_rows,
                    n_ok,
                    h_ptr,
                    stride_h,
                    n,
                    t,
                    t_ok,
                    GATED,
                    ACT,
                    HAS_BIAS,
                )
                tl.store(cnt_ptr + pid, 0)
    else:
        j = pid - n_heavy_prog
        if LIGHT == 1:
            if j < n_light_prog:
                # low-rank inner vectors z = x B^T (B rows follow the heavy rows in W1)
                k_lo, k_hi = _k_slice(d, s, SPLIT, BLOCK_K)
                r = j * BLOCK_N + tl.arange(0, BLOCK_N)
                r_ok = r < r_first
                if GATED:
                    rows = r + 2 * m_heavy
                else:
                    rows = r + m_heavy
                acc = _row_dot(
                    zeros,
                    x_ptr,
                    stride_x,
                    T,
                    w_ptr,
                    rows,
                    r_ok,
                    k_lo,
                    k_hi,
                    d,
                    BLOCK_T,
                    BLOCK_N,
                    BLOCK_K,
                    STAGES,
                )
                mask = t_ok[:, None] & r_ok[None, :]
                z_out = z_ptr + t[:, None] * stride_z + r[None, :]
                if SPLIT == 1:
                    tl.store(z_out, acc, mask=mask)
                else:
                    ws = ws_ptr + t[:, None] * ws_cols + (m_heavy + r)[None, :]
                    tl.store(ws + 2 * s * plane, acc, mask=mask)
                    arrived = _arrive(cnt_ptr + pid)
                    if arrived == SPLIT - 1:
                        tl.store(z_out, _gather(ws, mask, 2 * plane, SPLIT), mask=mask)
                        tl.store(cnt_ptr + pid, 0)
            else:
                if s == 0:
                    # the one extra program: zero the hidden columns the chain accumulates into
                    for c0 in range(0, zero_cols, BLOCK_N):
                        c = c0 + tl.arange(0, BLOCK_N)
                        tl.store(
                            h_ptr + t[:, None] * stride_h + (zero_offset + c)[None, :],
                            zeros,
                            mask=t_ok[:, None] & (c < zero_cols)[None, :],
                        )
        if LIGHT == 2:
            # int4 light neurons: gate rows [0, m_light), up rows [m_light, 2 m_light) if gated;
            # the slices split the groups of d
            g_lo, g_hi = _k_slice(d // GROUP, s, SPLIT, 1)
            n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < m_light
            if GATED:
                up_rows = n + m_light
            else:
                up_rows = n
            acc_u = _q4_row_dot(
                zeros,
                x_ptr,
                stride_x,
                T,
                q_ptr,
                qs_ptr,
                qz_ptr,
                up_rows,
                n_ok,
                g_lo,
                g_hi,
                d,
                BLOCK_T,
                BLOCK_N,
                GROUP,
                STAGES,
            )
            if GATED:
                acc_g = _q4_row_dot(
                    zeros,
                    x_ptr,
                    stride_x,
                    T,
                    q_ptr,
                    qs_ptr,
                    qz_ptr,
                    n,
                    n_ok,
                    g_lo,
                    g_hi,
                    d,
                    BLOCK_T,
                    BLOCK_N,
                    GROUP,
                    STAGES,
                )
            else:
                acc_g = acc_u
            cols = m_heavy + n
            if SPLIT == 1:
                _act_store(
                    acc_g,
                    acc_u,
                    qb_ptr,
                    n,
                    up_rows,
                    n_ok,
                    h_ptr,
                    stride_h,
                    cols,
                    t,
                    t_ok,
                    GATED,
                    ACT,
                    HAS_QBIAS,
                )
            else:
                mask = t_ok[:, None] & n_ok[None, :]
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
                        qb_ptr,
                        n,
                        up_rows,
                        n_ok,
                        h_ptr,
                        stride_h,
                        cols,
                        t,
                        t_ok,
                        GATED,
                        ACT,
                        HAS_QBIAS,
                    )
                    tl.store(cnt_ptr + pid, 0)


@triton.jit
def _chain_kernel(
    z_ptr,
    stride_z,
    T,
    ag_ptr,
    au_ptr,
    bg_ptr,
    bu_ptr,
    bd_ptr,
    out_ptr,
    stride_o,
    m_light,
    r_gate,
    r_up,
    r_down,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < m_light
    if PREFETCH > 0:
        _prefetch_rows(au_ptr, n, n_ok, 0, r_up, r_up, PREFETCH)
        if GATED:
            _prefetch_rows(ag_ptr, n, n_ok, 0, r_gate, r_gate, PREFETCH)
    _pdl_enter(PDL)
    zeros = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    if GATED:
        up_offset = r_gate
    else:
        up_offset = 0
    acc_u = _row_dot(
        zeros,
        z_ptr + up_offset,
        stride_z,
        T,
        au_ptr,
        n,
        n_ok,
        0,
        r_up,
        r_up,
        BLOCK_T,
        BLOCK_N,
        BLOCK_R,
        STAGES,
    )
    if HAS_BIAS:
        acc_u += tl.load(bu_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc_g = _row_dot(
            zeros,
            z_ptr,
            stride_z,
            T,
            ag_ptr,
            n,
            n_ok,
            0,
            r_gate,
            r_gate,
            BLOCK_T,
            BLOCK_N,
            BLOCK_R,
            STAGES,
        )
        if HAS_BIAS:
            acc_g += tl.load(bg_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_u, ACT)
    h = tl.where(t_ok[:, None] & n_ok[None, :], h, 0.0)
    h_tile = h.to(bd_ptr.dtype.element_ty)  # 16 tokens: tensor-core operand
    h_one = tl.sum(h, axis=0)  # one token: [BLOCK_N] fp32
    for r0 in tl.range(0, r_down, BLOCK_R, num_stages=STAGES):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_down
        b = tl.load(
            bd_ptr + n[:, None] * r_down + r[None, :],
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        if BLOCK_T == 1:
            part = tl.sum(b.to(tl.float32) * h_one[:, None], axis=0)[None, :]
        else:
            part = tl.dot(h_tile, b)
        tl.atomic_add(
            out_ptr + t[:, None] * stride_o + r[None, :],
            part,
            mask=t_ok[:, None] & r_ok[None, :],
            sem="relaxed",
        )


@triton.jit
def _last_kernel(
    h_ptr,
    stride_h,
    T,
    w_ptr,
    k_dense,
    q_ptr,
    qs_ptr,
    qz_ptr,
    k_quant,
    k_quant_padded,
    b_ptr,
    y_ptr,
    stride_y,
    d,
    ws_ptr,
    cnt_ptr,
    HAS_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr,
    QBLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    # grid: (output row blocks, SPLIT slices of the hidden columns: each slice takes its share
    # of the dense columns and of the int4 light blocks); partial sums as in _first_kernel,
    # workspace [SPLIT, T, d]
    pid = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    o = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < d
    k_lo, k_hi = _k_slice(k_dense, s, SPLIT, BLOCK_K)
    if PREFETCH > 0:
        _prefetch_rows(w_ptr, o, o_ok, k_lo, k_hi, k_dense, PREFETCH)
    _pdl_enter(PDL)
    acc = _row_dot(
        tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
        h_ptr,
        stride_h,
        T,
        w_ptr,
        o,
        o_ok,
        k_lo,
        k_hi,
        k_dense,
        BLOCK_T,
        BLOCK_N,
        BLOCK_K,
        STAGES,
    )
    if HAS_Q:
        # int4 light columns: codes [d, k_quant_padded / 2], half-split within QBLOCK neurons;
        # scales/zeros [d / GROUP, k_quant_padded] (group-major: this program's rows share one
        # group, so its scales are one contiguous row)
        HALF: tl.constexpr = QBLOCK // 2
        Q_STEP: tl.constexpr = QBLOCK * ((BLOCK_K + QBLOCK - 1) // QBLOCK)  # neurons per step
        c = tl.arange(0, Q_STEP // 2)  # byte of the step
        lo_of = (c // HALF) * QBLOCK + c % HALF  # its low-nibble neuron, within the step
        og = (pid * BLOCK_N) // GROUP
        s_row = qs_ptr + og * k_quant_padded
        z_row = qz_ptr + og * k_quant_padded
        wdt = w_ptr.dtype.element_ty
        j_start, j_end = _k_slice(k_quant, s, SPLIT, Q_STEP)
        if BLOCK_T == 1:
            wide = tl.zeros((BLOCK_N, Q_STEP // 2), tl.float32)
        for jb in tl.range(j_start, j_end, Q_STEP, num_stages=STAGES):
            j_lo = jb + lo_of
            j_hi = j_lo + HALF
            lo_ok = j_lo < k_quant
            hi_ok = j_hi < k_quant
            h_lo = tl.load(
                h_ptr + t[:, None] * stride_h + (k_dense + j_lo)[None, :],
                mask=t_ok[:, None] & lo_ok[None, :],
                other=0.0,
            )
            h_hi = tl.load(
                h_ptr + t[:, None] * stride_h + (k_dense + j_hi)[None, :],
                mask=t_ok[:, None] & hi_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                q_ptr + o[:, None] * (k_quant_padded // 2) + (jb // 2 + c)[None, :],
                mask=o_ok[:, None] & lo_ok[None, :],
                other=0,
                eviction_policy="evict_first",
            )
            s_lo = tl.load(s_row + j_lo, mask=lo_ok, other=0.0).to(tl.float32)
            s_hi = tl.load(s_row + j_hi, mask=hi_ok, other=0.0).to(tl.float32)
            z_lo = tl.load(z_row + j_lo, mask=lo_ok, other=0.0).to(tl.float32)
            z_hi = tl.load(z_row + j_hi, mask=hi_ok, other=0.0).to(tl.float32)
            w_lo = (b & 15).to(tl.float32) * s_lo[None, :] + z_lo[None, :]
            w_hi = (b >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :]
            if BLOCK_T == 1:
                wide += w_lo * h_lo + w_hi * h_hi
            else:
                acc += tl.dot(h_lo.to(wdt), tl.trans(w_lo.to(wdt)))
                acc += tl.dot(h_hi.to(wdt), tl.trans(w_hi.to(wdt)))
        if BLOCK_T == 1:
            acc += tl.sum(wide, axis=1)[None, :]
    mask = t_ok[:, None] & o_ok[None, :]
    y_out = y_ptr + t[:, None] * stride_y + o[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws = ws_ptr + t[:, None] * d + o[None, :]
        tl.store(ws + s * T * d, acc, mask=mask)
        arrived = _arrive(cnt_ptr + pid)
        if arrived == SPLIT - 1:
            total = _gather(ws, mask, T * d, SPLIT)
            if HAS_BIAS:
                total += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_out, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + pid, 0)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, cols, n_groups, GROUP: tl.constexpr):
    """out[row, :] = dequant(q[row, :]) for the half-split-within-group row layout (prefill path)."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    HALF: tl.constexpr = GROUP // 2
    c = tl.arange(0, HALF)
    b = tl.load(q_ptr + row * (cols // 2) + g * HALF + c)
    s = tl.load(s_ptr + row * n_groups + g).to(tl.float32)
    z = tl.load(z_ptr + row * n_groups + g).to(tl.float32)
    base = out_ptr + row * cols + g * GROUP
    tl.store(base + c, ((b & 15).to(tl.float32) * s + z).to(out_ptr.dtype.element_ty))
    tl.store(base + HALF + c, ((b >> 4).to(tl.float32) * s + z).to(out_ptr.dtype.element_ty))


# Tiles tried on the first call per weight shape, by one autotuner per token mode: "one" (1 token)
# and "tile" (2-16 tokens). first/last: (BLOCK_T, BLOCK_N, BLOCK_K, SPLIT, warps, stages); chain:
# (BLOCK_T, BLOCK_N, BLOCK_R, warps, stages). BLOCK_T 1 is the CUDA-core GEMV, 16 the tensor-core
# tile (at 1 token both compete). SPLIT slices of the reduction multiply the programs of the small
# first/last matrices (NOTES-h200.md: 90-230 programs on 132 SMs without); the unsplit tiles of
# the previous kernels stay in the lists, so a shape where splitting does not pay keeps them. At
# 16 tokens every program re-reads the [16, K] activations from L2 (as many bytes as its weights
# at BLOCK_N 32): the BLOCK_N 64 tiles halve that.
_TILES: dict[tuple[str, str], list[tuple[int, ...]]] = {
    ("first", "one"): [
        (1, 32, 256, 4, 4, 3),
        (1, 16, 512, 4, 4, 3),
        (1, 64, 128, 8, 8, 3),
        (1, 64, 128, 4, 8, 3),
        (16, 32, 256, 4, 4, 3),
        (16, 32, 256, 1, 4, 3),
    ],
    ("first", "tile"): [
        (16, 16, 256, 4, 4, 3),
        (16, 32, 256, 4, 4, 3),
        (16, 32, 128, 8, 4, 3),
        (16, 64, 128, 4, 4, 3),
        (16, 32, 256, 1, 4, 3),
        (16, 16, 256, 1, 4, 4),
    ],
    ("last", "one"): [
        (1, 32, 256, 4, 4, 3),
        (1, 16, 512, 4, 4, 3),
        (1, 16, 512, 2, 4, 3),
        (1, 32, 256, 2, 4, 3),
        (16, 32, 256, 4, 4, 3),
        (16, 32, 256, 1, 4, 3),
    ],
    ("last", "tile"): [
        (16, 16, 256, 4, 4, 3),
        (16, 32, 256, 4, 4, 3),
        (16, 32, 128, 8, 4, 3),
        (16, 64, 128, 4, 4, 3),
        (16, 32, 256, 1, 4, 3),
        (16, 16, 256, 1, 4, 4),
    ],
    ("chain", "one"): [
        (1, 16, 256, 4, 3),
        (1, 32, 128, 4, 3),
        (1, 64, 128, 8, 3),
        (16, 32, 128, 4, 3),
        (16, 16, 128, 4, 3),
    ],
    ("chain", "tile"): [
        (16, 16, 128, 4, 3),
        (16, 32, 64, 4, 3),
        (16, 32, 128, 4, 3),
        (16, 64, 64, 4, 3),
    ],
}
# One tile for the interpreter (no timing there) and for tests (which patch it to try others);
# BLOCK_T, when absent, follows the tokens (1 for one token, else 16). An odd SPLIT exercises
# empty and uneven slices.
_FIXED: dict[str, dict[str, int]] = {
    "first": {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT": 3},
    "chain": {"BLOCK_N": 32, "BLOCK_R": 64},
    "last": {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT": 3},
}
_kernels: dict[tuple[str, str], object] = {}
_COUNTER_SLOTS = 1 << 15  # per stage: row blocks of one launch (first: ~N1 / 16, last: d / 16)
_counters: dict[tuple[torch.device, str], Tensor] = {}


def autotuning() -> bool:
    """Tiles are autotuned on a GPU unless FFSPLIT_KERNEL_AUTOTUNE=0 (tests: one fixed tile)."""
    return not interpreting() and os.environ.get("FFSPLIT_KERNEL_AUTOTUNE", "1") != "0"


def _mode(tokens: int) -> str:
    return "one" if tokens == 1 else "tile"


def _tile_meta(name: str, tile: tuple[int, ...]) -> dict[str, int]:
    if name == "chain":
        block_t, bn, br, _, stages = tile
        return {"BLOCK_T": block_t, "BLOCK_N": bn, "BLOCK_R": br, "STAGES": stages}
    block_t, bn, bk, split, _, stages = tile
    return {"BLOCK_T": block_t, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "STAGES": stages}


def _configs(name: str, mode: str) -> list[triton.Config]:
    return [
        triton.Config(_tile_meta(name, tile), num_warps=tile[-2], num_stages=tile[-1])
        for tile in _TILES[name, mode]
    ]


def _kernel(name: str, mode: str = "tile") -> object:
    """The autotuned kernel on a GPU (one tuner per token mode: their best tiles differ); the
    plain kernel with one fixed tile otherwise."""
    if (name, mode) in _kernels:
        return _kernels[name, mode]
    raw = {"first": _first_kernel, "chain": _chain_kernel, "last": _last_kernel}[name]
    if not autotuning():
        kernel = raw
    elif name == "first":
        kernel = triton.autotune(_configs(name, mode), key=["d", "m_heavy", "r_first", "m_light"])(
            raw
        )
    elif name == "chain":
        # atomics accumulate: every timed try must start from the same buffer
        kernel = triton.autotune(
            _configs(name, mode),
            key=["m_light", "r_gate", "r_up", "r_down"],
            restore_value=["out_ptr"],
        )(raw)
    else:
        kernel = triton.autotune(_configs(name, mode), key=["d", "k_dense", "k_quant"])(raw)
    _kernels[name, mode] = kernel
    return kernel


def _fixed_meta(name: str, tokens: int) -> dict[str, int]:
    """Launch meta-parameters outside autotuning: the fixed tile (the tuner supplies them)."""
    if autotuning():
        return {}
    meta = {"BLOCK_T": 1 if tokens == 1 else BLOCK_T, "STAGES": 2, **_FIXED[name]}
    if tokens > 1:
        meta["BLOCK_T"] = BLOCK_T  # the one-token GEMV reads row 0 only
    return meta


@functools.cache
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_options(name: str, device: torch.device) -> dict[str, int | bool]:
    """Programmatic dependent launch, opt-in on sm_90+ with FFSPLIT_KERNEL_PDL=1 (not yet timed on
    a GPU: bench/results/NOTES-h200.md): the three launches of an FFN overlap their launch and
    ramp-up with the previous kernel's tail; chain and last first ask L2 for
    FFSPLIT_KERNEL_PREFETCH (default 4) 128-byte lines of each weight row. Read per call, so a
    benchmark can compare both in one process (the kernels differ by constexpr, tiles are shared)."""
    on = not interpreting() and os.environ.get("FFSPLIT_KERNEL_PDL", "0") == "1" and _sm90(device)
    options: dict[str, int | bool] = {"PDL": on, "launch_pdl": on}
    if name != "first":
        lines = int(os.environ.get("FFSPLIT_KERNEL_PREFETCH", "4")) if on else 0
        if lines & (lines - 1):
            raise FFSplitError(f"FFSPLIT_KERNEL_PREFETCH={lines}: must be 0 or a power of two")
        options["PREFETCH"] = lines
    return options


def _max_split(name: str, mode: str) -> int:
    if not autotuning():
        return _FIXED[name]["SPLIT"]
    return max(tile[3] for tile in _TILES[name, mode])


def _min_block(name: str, mode: str) -> int:
    if not autotuning():
        return _FIXED[name]["BLOCK_N"]
    return min(tile[1] for tile in _TILES[name, mode])


def _split_state(
    name: str, mode: str, device: torch.device, blocks: int, plane: int
) -> tuple[Tensor, Tensor]:
    """(workspace fp32 [max SPLIT * plane], arrival counters int32) for a split-K launch.

    The counters live for the process, one zeroed set per device and stage, and every launch
    leaves them zero (the last slice of a block resets its counter); launches of one stage must
    therefore not run concurrently on two streams of one device. Allocated on the first call:
    warm up before capturing a CUDA graph (autotuning needs that anyway)."""
    split = _max_split(name, mode)
    if split > 1 and blocks > _COUNTER_SLOTS:
        raise FFSplitError(
            f"ffsplit.kernels.ffn.{name}: {blocks} row blocks exceed the {_COUNTER_SLOTS} "
            f"split-K counters; raise _COUNTER_SLOTS or the smallest BLOCK_N"
        )
    key = (device, name)
    counters = _counters.get(key)
    if counters is None:
        counters = _counters[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    workspace = torch.empty(max(split * plane, 1), device=device, dtype=torch.float32)
    return workspace, counters


def first(
    x: Tensor,
    w1: Tensor,
    bias: Tensor | None,
    *,
    gated: bool,
    act: str,
    m_heavy: int,
    light: str,
    hidden_cols: int,
    r_first: int = 0,
    zero_offset: int = 0,
    zero_cols: int = 0,
    q1: Tensor | None = None,
    q1_scales: Tensor | None = None,
    q1_zeros: Tensor | None = None,
    q1_bias: Tensor | None = None,
    m_light: int = 0,
    group: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Stage 1 for x [T, d], T <= 16: (hidden fp32 [T, hidden_cols], z fp32 [T, r_first] or None).

    hidden gets ``act(g) * u`` of the heavy neurons at [0, m_heavy) and, for int4 light neurons,
    at [m_heavy, m_heavy + m_light); columns [zero_offset, zero_offset + zero_cols) are zeroed.
    """
    tokens, d = x.shape
    kind = LIGHT_KINDS[light]
    mode = _mode(tokens)
    hidden = torch.empty(tokens, hidden_cols, device=x.device, dtype=torch.float32)
    z = torch.empty(tokens, max(r_first, 1), device=x.device, dtype=torch.float32)
    quant = kind == 2

    def blocks(bn: int) -> int:
        programs = triton.cdiv(m_heavy, bn)
        if kind == 1:
            programs += triton.cdiv(r_first, bn) + 1
        elif kind == 2:
            programs += triton.cdiv(m_light, bn)
        return max(programs, 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (blocks(meta["BLOCK_N"]), meta["SPLIT"])

    ws_cols = m_heavy + max(r_first, m_light, 1)
    workspace, counters = _split_state(
        "first", mode, x.device, blocks(_min_block("first", mode)), 2 * tokens * ws_cols
    )
    _kernel("first", mode)[grid](
        x,
        x.stride(0),
        tokens,
        d,
        w1,
        bias if bias is not None else w1,
        hidden,
        hidden.stride(0),
        z,
        z.stride(0),
        q1 if quant else w1,
        q1_scales if quant else w1,
        q1_zeros if quant else w1,
        q1_bias if q1_bias is not None else w1,
        workspace,
        ws_cols,
        counters,
        m_heavy,
        r_first,
        m_light,
        zero_offset,
        zero_cols,
        GATED=gated,
        ACT=act,
        LIGHT=kind,
        HAS_BIAS=bias is not None,
        HAS_QBIAS=q1_bias is not None,
        GROUP=group,
        **_fixed_meta("first", tokens),
        **_launch_options("first", x.device),
    )
    return hidden, (z if r_first else None)


def lowrank_chain(
    z: Tensor,
    out: Tensor,
    a_gate: Tensor | None,
    a_up: Tensor,
    b_down_t: Tensor,
    *,
    gated: bool,
    act: str,
    bias_gate: Tensor | None = None,
    bias_up: Tensor | None = None,
) -> None:
    """out[T, r_down] (fp32, zeroed by ``first``) += (act(z_g A_g^T) * (z_u A_u^T)) B_down^T.

    z [T, r_gate + r_up] (gate inner first); a_* [m_L, r]; b_down_t [m_L, r_down].
    """
    tokens = z.shape[0]
    mode = _mode(tokens)
    m_light, r_up = a_up.shape
    r_gate = a_gate.shape[1] if a_gate is not None else 0
    r_down = b_down_t.shape[1]
    has_bias = bias_up is not None
    if has_bias and gated and bias_gate is None:
        bias_gate = torch.zeros_like(bias_up)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m_light, meta["BLOCK_N"]),)

    _kernel("chain", mode)[grid](
        z,
        z.stride(0),
        tokens,
        a_gate if a_gate is not None else a_up,
        a_up,
        bias_gate if has_bias and gated else a_up,
        bias_up if has_bias else a_up,
        b_down_t,
        out,
        out.stride(0),
        m_light,
        r_gate,
        r_up,
        r_down,
        GATED=gated,
        ACT=act,
        HAS_BIAS=has_bias,
        **_fixed_meta("chain", tokens),
        **_launch_options("chain", z.device),
    )


def last(
    hidden: Tensor,
    w3: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    *,
    q3: Tensor | None = None,
    q3_scales: Tensor | None = None,
    q3_zeros: Tensor | None = None,
    k_quant: int = 0,
    group: int = 64,
) -> Tensor:
    """y [T, d] = hidden[:, :K] @ w3^T (+ hidden[:, K:K+k_quant] @ dequant(q3)^T) + bias.

    w3 [d, K] (K = its columns); q3 [d, k_quant_padded / 2] half-split within QUANT_BLOCK
    neurons; q3 scales/zeros [d / group, k_quant_padded] (group-major).
    """
    tokens = hidden.shape[0]
    mode = _mode(tokens)
    d, k_dense = w3.shape
    y = torch.empty(tokens, d, device=hidden.device, dtype=out_dtype)
    quant = q3 is not None and k_quant > 0
    k_padded = q3.shape[1] * 2 if quant else 0

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(d, meta["BLOCK_N"]), meta["SPLIT"])

    workspace, counters = _split_state(
        "last", mode, hidden.device, triton.cdiv(d, _min_block("last", mode)), tokens * d
    )
    _kernel("last", mode)[grid](
        hidden,
        hidden.stride(0),
        tokens,
        w3,
        k_dense,
        q3 if quant else w3,
        q3_scales if quant else w3,
        q3_zeros if quant else w3,
        k_quant,
        k_padded,
        bias if bias is not None else w3,
        y,
        y.stride(0),
        d,
        workspace,
        counters,
        HAS_Q=quant,
        HAS_BIAS=bias is not None,
        GROUP=group,
        QBLOCK=QUANT_BLOCK,
        **_fixed_meta("last", tokens),
        **_launch_options("last", hidden.device),
    )
    return y


def dequantize_rows(
    q: Tensor, scales: Tensor, zeros: Tensor, group: int, dtype: torch.dtype
) -> Tensor:
    """[rows, cols] weights from half-split-within-group int4 rows (prefill path, one launch)."""
    rows = q.shape[0]
    cols = q.shape[1] * 2
    out = torch.empty(rows, cols, device=q.device, dtype=dtype)
    _dequant_kernel[(rows, cols // group)](q, scales, zeros, out, cols, cols // group, GROUP=group)
    return out


# ------------------------------------------------------------------------------------------
# Custom ops: the kernel paths as single opaque ops, so torch.compile traces around them (its
# fusions of the rest of the model stay intact) and CUDA graphs capture them like any op.
# ------------------------------------------------------------------------------------------


@torch.library.custom_op("ffsplit::fused_first", mutates_args=())
def fused_first(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    a_gate: Tensor | None,
    a_up: Tensor | None,
    bias_gate: Tensor | None,
    bias_up: Tensor | None,
    b_down_t: Tensor | None,
    q1: Tensor | None,
    q1_scales: Tensor | None,
    q1_zeros: Tensor | None,
    q1_bias: Tensor | None,
    gated: bool,
    act: str,
    light: str,
    m_heavy: int,
    r_gate: int,
    r_up: int,
    r_down: int,
    m_light: int,
    group: int,
    hidden_cols: int,
) -> Tensor:
    """Stage 1 (and the low-rank chain): x [T, d] -> hidden fp32 [T, hidden_cols]."""
    if light == "lowrank":
        hidden, z = first(
            x,
            w1,
            b1,
            gated=gated,
            act=act,
            m_heavy=m_heavy,
            light="lowrank",
            hidden_cols=hidden_cols,
            r_first=r_gate + r_up,
            zero_offset=m_heavy,
            zero_cols=r_down,
        )
        lowrank_chain(
            z,
            hidden[:, m_heavy:],
            a_gate,
            a_up,
            b_down_t,
            gated=gated,
            act=act,
            bias_gate=bias_gate,
            bias_up=bias_up,
        )
        return hidden
    if light == "quant":
        hidden, _ = first(
            x,
            w1,
            b1,
            gated=gated,
            act=act,
            m_heavy=m_heavy,
            light="quant",
            hidden_cols=hidden_cols,
            q1=q1,
            q1_scales=q1_scales,
            q1_zeros=q1_zeros,
            q1_bias=q1_bias,
            m_light=m_light,
            group=group,
        )
        return hidden
    hidden, _ = first(
        x, w1, b1, gated=gated, act=act, m_heavy=m_heavy, light="none", hidden_cols=hidden_cols
    )
    return hidden


@fused_first.register_fake
def _(
    x,
    w1,
    b1,
    a_gate,
    a_up,
    bias_gate,
    bias_up,
    b_down_t,
    q1,
    q1_scales,
    q1_zeros,
    q1_bias,
    gated,
    act,
    light,
    m_heavy,
    r_gate,
    r_up,
    r_down,
    m_light,
    group,
    hidden_cols,
):
    return x.new_empty(x.shape[0], hidden_cols, dtype=torch.float32)


@torch.library.custom_op("ffsplit::fused_last", mutates_args=())
def fused_last(
    hidden: Tensor,
    w3: Tensor,
    b3: Tensor | None,
    q3: Tensor | None,
    q3_scales: Tensor | None,
    q3_zeros: Tensor | None,
    k_quant: int,
    group: int,
) -> Tensor:
    """Stage 3: hidden fp32 [T, K] -> y [T, d] in the weights' dtype."""
    return last(
        hidden,
        w3,
        b3,
        w3.dtype,
        q3=q3,
        q3_scales=q3_scales,
        q3_zeros=q3_zeros,
        k_quant=k_quant,
        group=group,
    )


@fused_last.register_fake
def _(hidden, w3, b3, q3, q3_scales, q3_zeros, k_quant, group):
    return hidden.new_empty(hidden.shape[0], w3.shape[0], dtype=w3.dtype)
