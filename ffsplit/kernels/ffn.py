"""Split-FFN decode kernels: three launches per FFN, weights read once, intermediates in registers.

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

All kernels pad the token dimension to 16 rows (tensor-core tile), so one compiled kernel serves
1 to 16 tokens. Launch wrappers autotune over a few tile shapes per weight shape (first call only:
warm up before capturing a CUDA graph).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    k_len,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[t, n] += sum_k x[t, k] * w[rows[n], k] over k < k_len (w row-major, row stride k_len)."""
    t = tl.arange(0, BLOCK_T)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_len
        x = tl.load(
            x_ptr + t[:, None] * stride_x + k[None, :],
            mask=(t[:, None] < T) & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + rows[:, None] * k_len + k[None, :],
            mask=rows_ok[:, None] & k_ok[None, :],
            other=0.0,
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
    d,
    BLOCK_T: tl.constexpr,
    GROUP: tl.constexpr,
):
    """acc[t, n] += x[t, :] . dequant(q[rows[n], :]): int4 rows, groups of GROUP along d,
    half-split packed within each group (one group per step, one scale per row per step)."""
    HALF: tl.constexpr = GROUP // 2
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    c = tl.arange(0, HALF)
    n_groups = d // GROUP
    for g in range(0, n_groups):
        k = g * GROUP + c
        x_lo = tl.load(x_ptr + t[:, None] * stride_x + k[None, :], mask=t_ok[:, None], other=0.0)
        x_hi = tl.load(
            x_ptr + t[:, None] * stride_x + (k + HALF)[None, :], mask=t_ok[:, None], other=0.0
        )
        b = tl.load(
            q_ptr + rows[:, None] * (d // 2) + (g * HALF + c)[None, :],
            mask=rows_ok[:, None],
            other=0,
        )
        s = tl.load(s_ptr + rows * n_groups + g, mask=rows_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * n_groups + g, mask=rows_ok, other=0.0).to(tl.float32)
        lo = ((b & 15).to(tl.float32) * s[:, None] + z[:, None]).to(x_lo.dtype)
        hi = ((b >> 4).to(tl.float32) * s[:, None] + z[:, None]).to(x_lo.dtype)
        acc += tl.dot(x_lo, tl.trans(lo))
        acc += tl.dot(x_hi, tl.trans(hi))
    return acc


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
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    n_heavy_prog = tl.cdiv(m_heavy, BLOCK_N)
    n_light_prog = tl.cdiv(r_first, BLOCK_N)
    if pid < n_heavy_prog:
        # heavy neurons: gate and up rows of the same neurons, activation fused
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < m_heavy
        if GATED:
            up_rows = n + m_heavy
        else:
            up_rows = n
        acc_u = _row_dot(
            tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
            x_ptr,
            stride_x,
            T,
            w_ptr,
            up_rows,
            n_ok,
            d,
            BLOCK_T,
            BLOCK_K,
        )
        if HAS_BIAS:
            acc_u += tl.load(b_ptr + up_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_g = _row_dot(
                tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
                x_ptr,
                stride_x,
                T,
                w_ptr,
                n,
                n_ok,
                d,
                BLOCK_T,
                BLOCK_K,
            )
            if HAS_BIAS:
                acc_g += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            h = _activate(acc_g, ACT) * acc_u
        else:
            h = _activate(acc_u, ACT)
        tl.store(h_ptr + t[:, None] * stride_h + n[None, :], h, mask=t_ok[:, None] & n_ok[None, :])
    else:
        j = pid - n_heavy_prog
        if LIGHT == 1:
            if j < n_light_prog:
                # low-rank inner vectors z = x B^T (B rows follow the heavy rows in W1)
                r = j * BLOCK_N + tl.arange(0, BLOCK_N)
                r_ok = r < r_first
                if GATED:
                    rows = r + 2 * m_heavy
                else:
                    rows = r + m_heavy
                acc = _row_dot(
                    tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
                    x_ptr,
                    stride_x,
                    T,
                    w_ptr,
                    rows,
                    r_ok,
                    d,
                    BLOCK_T,
                    BLOCK_K,
                )
                tl.store(
                    z_ptr + t[:, None] * stride_z + r[None, :],
                    acc,
                    mask=t_ok[:, None] & r_ok[None, :],
                )
            else:
                # the one extra program: zero the hidden columns the chain accumulates into
                zeros = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
                for c0 in range(0, zero_cols, BLOCK_N):
                    c = c0 + tl.arange(0, BLOCK_N)
                    tl.store(
                        h_ptr + t[:, None] * stride_h + (zero_offset + c)[None, :],
                        zeros,
                        mask=t_ok[:, None] & (c < zero_cols)[None, :],
                    )
        if LIGHT == 2:
            # int4 light neurons: gate rows [0, m_light), up rows [m_light, 2 m_light) if gated
            n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < m_light
            if GATED:
                up_rows = n + m_light
            else:
                up_rows = n
            acc_u = _q4_row_dot(
                tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
                x_ptr,
                stride_x,
                T,
                q_ptr,
                qs_ptr,
                qz_ptr,
                up_rows,
                n_ok,
                d,
                BLOCK_T,
                GROUP,
            )
            if HAS_QBIAS:
                acc_u += tl.load(qb_ptr + up_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_g = _q4_row_dot(
                    tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
                    x_ptr,
                    stride_x,
                    T,
                    q_ptr,
                    qs_ptr,
                    qz_ptr,
                    n,
                    n_ok,
                    d,
                    BLOCK_T,
                    GROUP,
                )
                if HAS_QBIAS:
                    acc_g += tl.load(qb_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                h = _activate(acc_g, ACT) * acc_u
            else:
                h = _activate(acc_u, ACT)
            tl.store(
                h_ptr + t[:, None] * stride_h + (m_heavy + n)[None, :],
                h,
                mask=t_ok[:, None] & n_ok[None, :],
            )


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
):
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < m_light
    if GATED:
        up_offset = r_gate
    else:
        up_offset = 0
    acc_u = _row_dot(
        tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
        z_ptr + up_offset,
        stride_z,
        T,
        au_ptr,
        n,
        n_ok,
        r_up,
        BLOCK_T,
        BLOCK_R,
    )
    if HAS_BIAS:
        acc_u += tl.load(bu_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc_g = _row_dot(
            tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
            z_ptr,
            stride_z,
            T,
            ag_ptr,
            n,
            n_ok,
            r_gate,
            BLOCK_T,
            BLOCK_R,
        )
        if HAS_BIAS:
            acc_g += tl.load(bg_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_u, ACT)
    h = tl.where(t_ok[:, None] & n_ok[None, :], h, 0.0).to(bd_ptr.dtype.element_ty)
    for r0 in range(0, r_down, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_down
        b = tl.load(
            bd_ptr + n[:, None] * r_down + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0
        )
        part = tl.dot(h, b)
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
    HAS_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    o = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < d
    acc = _row_dot(
        tl.zeros((BLOCK_T, BLOCK_N), tl.float32),
        h_ptr,
        stride_h,
        T,
        w_ptr,
        o,
        o_ok,
        k_dense,
        BLOCK_T,
        BLOCK_K,
    )
    if HAS_Q:
        # int4 light columns: codes [d, k_quant_padded / 2], half-split within QBLOCK neurons;
        # scales/zeros [d / GROUP, k_quant_padded] (group-major: this program's rows share one
        # group, so its scales are one contiguous row)
        HALF: tl.constexpr = QBLOCK // 2
        c = tl.arange(0, HALF)
        og = (pid * BLOCK_N) // GROUP
        s_row = qs_ptr + og * k_quant_padded
        z_row = qz_ptr + og * k_quant_padded
        for jb in range(0, k_quant, QBLOCK):
            j_lo = jb + c
            j_hi = j_lo + HALF
            h_lo = tl.load(
                h_ptr + t[:, None] * stride_h + (k_dense + j_lo)[None, :],
                mask=t_ok[:, None] & (j_lo < k_quant)[None, :],
                other=0.0,
            )
            h_hi = tl.load(
                h_ptr + t[:, None] * stride_h + (k_dense + j_hi)[None, :],
                mask=t_ok[:, None] & (j_hi < k_quant)[None, :],
                other=0.0,
            )
            b = tl.load(
                q_ptr + o[:, None] * (k_quant_padded // 2) + (jb // 2 + c)[None, :],
                mask=o_ok[:, None],
                other=0,
            )
            s_lo = tl.load(s_row + j_lo).to(tl.float32)
            s_hi = tl.load(s_row + j_hi).to(tl.float32)
            z_lo = tl.load(z_row + j_lo).to(tl.float32)
            z_hi = tl.load(z_row + j_hi).to(tl.float32)
            w_lo = ((b & 15).to(tl.float32) * s_lo[None, :] + z_lo[None, :]).to(
                w_ptr.dtype.element_ty
            )
            w_hi = ((b >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :]).to(
                w_ptr.dtype.element_ty
            )
            acc += tl.dot(h_lo.to(w_lo.dtype), tl.trans(w_lo))
            acc += tl.dot(h_hi.to(w_hi.dtype), tl.trans(w_hi))
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + t[:, None] * stride_y + o[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=t_ok[:, None] & o_ok[None, :],
    )


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


def _configs(tiles: list[tuple[int, int, int, int]], name_k: str) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, name_k: bk}, num_warps=warps, num_stages=stages)
        for bn, bk, warps, stages in tiles
    ]


# Tile shapes (BLOCK_N, BLOCK_K or BLOCK_R, warps, stages) tried on the first call per weight
# shape. Decode GEMVs want many programs with several weight tiles in flight each.
_GEMV_TILES = [(16, 256, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3)]
_CHAIN_TILES = [(16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3)]
# One tile for the interpreter (no timing there) and for tests.
_FIXED = {"first": (32, 128), "chain": (32, 64), "last": (32, 128)}
_kernels: dict[str, object] = {}


def autotuning() -> bool:
    """Tiles are autotuned on a GPU unless FFSPLIT_KERNEL_AUTOTUNE=0 (tests: one fixed tile)."""
    return not interpreting() and os.environ.get("FFSPLIT_KERNEL_AUTOTUNE", "1") != "0"


def _kernel(name: str) -> object:
    """The autotuned kernel on a GPU; the plain kernel with one fixed tile otherwise."""
    if name in _kernels:
        return _kernels[name]
    raw = {"first": _first_kernel, "chain": _chain_kernel, "last": _last_kernel}[name]
    if not autotuning():
        kernel = raw
    elif name == "first":
        kernel = triton.autotune(
            _configs(_GEMV_TILES, "BLOCK_K"), key=["d", "m_heavy", "r_first", "m_light"]
        )(raw)
    elif name == "chain":
        # atomics accumulate: every timed try must start from the same buffer
        kernel = triton.autotune(
            _configs(_CHAIN_TILES, "BLOCK_R"),
            key=["m_light", "r_gate", "r_up", "r_down"],
            restore_value=["out_ptr"],
        )(raw)
    else:
        kernel = triton.autotune(_configs(_GEMV_TILES, "BLOCK_K"), key=["d", "k_dense", "k_quant"])(
            raw
        )
    _kernels[name] = kernel
    return kernel


def _fixed_meta(name: str) -> dict[str, int]:
    if autotuning():
        return {}
    bn, bk = _FIXED[name]
    return {"BLOCK_N": bn, ("BLOCK_R" if name == "chain" else "BLOCK_K"): bk}


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
    hidden = torch.empty(tokens, hidden_cols, device=x.device, dtype=torch.float32)
    z = torch.empty(tokens, max(r_first, 1), device=x.device, dtype=torch.float32)
    quant = kind == 2

    def grid(meta: dict) -> tuple[int]:
        bn = meta["BLOCK_N"]
        programs = triton.cdiv(m_heavy, bn)
        if kind == 1:
            programs += triton.cdiv(r_first, bn) + 1
        elif kind == 2:
            programs += triton.cdiv(m_light, bn)
        return (max(programs, 1),)

    _kernel("first")[grid](
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
        BLOCK_T=BLOCK_T,
        GROUP=group,
        **_fixed_meta("first"),
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
    m_light, r_up = a_up.shape
    r_gate = a_gate.shape[1] if a_gate is not None else 0
    r_down = b_down_t.shape[1]
    has_bias = bias_up is not None
    if has_bias and gated and bias_gate is None:
        bias_gate = torch.zeros_like(bias_up)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m_light, meta["BLOCK_N"]),)

    _kernel("chain")[grid](
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
        BLOCK_T=BLOCK_T,
        **_fixed_meta("chain"),
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
    d, k_dense = w3.shape
    y = torch.empty(tokens, d, device=hidden.device, dtype=out_dtype)
    quant = q3 is not None and k_quant > 0
    k_padded = q3.shape[1] * 2 if quant else 0

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(d, meta["BLOCK_N"]),)

    _kernel("last")[grid](
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
        HAS_Q=quant,
        HAS_BIAS=bias is not None,
        BLOCK_T=BLOCK_T,
        GROUP=group,
        QBLOCK=QUANT_BLOCK,
        **_fixed_meta("last"),
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
