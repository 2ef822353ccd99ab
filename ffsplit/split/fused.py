"""Fast execution form of split FFNs: contiguous stacked weights, fused projections, Triton decode.

A split FFN (split/modules.py) runs its parts one by one: 5-7 small kernels per FFN, which makes it
about 2x slower than the dense FFN at decode sizes (method.md, "Known engineering facts").
``fuse_model`` rewrites each FFN into one ``FusedFFNCore`` holding:

- ``w1`` [N1, d]: the first-projection rows stacked ``[gate_H; up_H; B_gate; B_up]`` (one GEMM),
- low-rank light factors ``a_gate``, ``a_up`` [m_L, r] and ``b_down_t`` = B_down^T [m_L, r],
- int4 light codes repacked for the kernels (``q1`` gate/up rows, ``q3`` down),
- ``w3`` [d, K] = ``[down_H | A_down]`` (the last projections as one GEMM), ``b3`` the down bias.

Forward: ``first(x)`` gives a compact hidden vector (``act(g)*u`` of the heavy neurons, then the
light part already projected to the down rank ``z_down = B_down h_L``, or int4 light activations),
``last(hidden)`` gives ``hidden @ w3^T + b3``. Up to 16 tokens on a GPU, Triton kernels do this in
three launches (ffsplit/kernels/ffn.py); otherwise (prefill, CPU) torch ops do it with a few large
GEMMs. Both are static-shape and sync-free, so they can be captured in a CUDA graph.

Where it goes: a gated FFN whose container computes ``down(act(gate(x)) * up(x))`` (Llama, Gemma)
is replaced whole by ``FusedFFN``; a non-gated FFN applied as up -> activation -> down by the
enclosing forward (OPT, GPT-2, BERT) gets ``FusedFirst`` as up, ``nn.Identity`` as activation and
``FusedLast`` as down. The model's forward is never rewritten. Each swap is checked on a random
probe against the modules it replaces.

Padding: heavy neurons and ranks are padded to multiples of 16 with zero rows/columns (exact:
act(0) * 0 = 0 and zero columns add nothing) so every row starts 32-byte aligned.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters.base import Adapter, FFNHandle
from ffsplit.errors import FFSplitError
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import (
    ColumnOutlierLinear,
    DenseLinear,
    LinearPart,
    LowRankLinear,
    QuantizedLinear,
)
from ffsplit.split.qformat import codes

ALIGN = 16  # rows/ranks padded to this many (32 bytes of bf16)
# Segments of a quantized FFN with at least QUANT_WHOLE neurons are padded to whole 128-neuron
# blocks (zero neurons: about 1% more bytes at 7B sizes): then every kernel tile is whole and its
# masks fold away (bench/results/NOTES-h200.md: per-row masks cost 2-3x the unpacking in `last`).
QUANT_WHOLE, QUANT_BLOCK_PAD = 1024, 128
DECODE_TOKENS = 16  # up to this many tokens the Triton decode kernels run (ffsplit/kernels/ffn.py)
DATAFLOWS = ("gated_mlp", "up_act_down")

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": nn.functional.silu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}


def activation_name(activation: Callable[[Tensor], Tensor]) -> str | None:
    """Which kernel activation an activation module computes, found by probing it (so any class,
    HF's or torch's, is recognised by what it does); None if none matches."""
    probe = torch.linspace(-8.0, 8.0, 257, dtype=torch.float64)
    try:
        with torch.no_grad():
            out = activation(probe.float()).double()
    except Exception:  # noqa: BLE001 - an activation that cannot run on CPU floats is unknown
        return None
    for name, fn in _ACTIVATIONS.items():
        if torch.allclose(out, fn(probe), rtol=1e-5, atol=1e-5):
            return name
    return None


def _pad_to(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple) if n else 0


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _pad_cols(t: Tensor, cols: int) -> Tensor:
    return (
        t if t.shape[1] == cols else torch.cat([t, t.new_zeros(t.shape[0], cols - t.shape[1])], 1)
    )


# --------------------------------------------------------------------------------------------
# Reading a split FFN into neuron ranges
# --------------------------------------------------------------------------------------------


@dataclass
class _Range:
    """One neuron range of an FFN: its up, gate (or None) and down parts."""

    up: LinearPart
    gate: LinearPart | None
    down: LinearPart

    @property
    def size(self) -> int:
        return self.up.out_features

    def kind(self) -> str:
        parts = [p for p in (self.up, self.gate, self.down) if p is not None]
        kinds = {type(p) for p in parts}
        if ColumnOutlierLinear in kinds:
            return "column_outlier"
        if kinds == {DenseLinear}:
            return "dense"
        if kinds == {LowRankLinear}:
            return "lowrank"
        if kinds == {QuantizedLinear}:
            return "quant"
        return "mixed"


def _parts(module: nn.Module) -> list[LinearPart] | None:
    if isinstance(module, SplitOutProjection | SplitInProjection):
        return list(module.parts)
    if isinstance(module, LinearPart):
        return [module]
    return None


def _ranges(
    adapter: Adapter, model: nn.Module, handle: FFNHandle
) -> tuple[list[_Range], Tensor | None]:
    """The FFN as aligned neuron ranges plus the down bias; plain (unsplit) FFNs are one dense range."""
    up_m = model.get_submodule(handle.up_path)
    down_m = model.get_submodule(handle.down_path)
    gate_m = model.get_submodule(handle.gate_path) if handle.gate_path else None
    if all(_parts(m) is None for m in (up_m, gate_m, down_m) if m is not None):
        w = adapter.weights(model, handle)  # plain projections (any class): canonical dense weights
        gate = DenseLinear(w.gate, w.gate_bias) if w.gate is not None else None
        return [_Range(DenseLinear(w.up, w.up_bias), gate, DenseLinear(w.down))], w.down_bias
    return _ranges_of(up_m, gate_m, down_m, f"layer {handle.layer}")


def _ranges_of(
    up_m: nn.Module, gate_m: nn.Module | None, down_m: nn.Module, where: str
) -> tuple[list[_Range], Tensor | None]:
    def parts(module: nn.Module) -> list[LinearPart]:
        found = _parts(module)
        if found is not None:
            return found
        if isinstance(module, nn.Linear):
            return [DenseLinear(module.weight, module.bias)]
        raise FFSplitError(f"{where}: cannot fuse a {type(module).__name__} projection")

    ups, downs = parts(up_m), parts(down_m)
    gates = parts(gate_m) if gate_m is not None else None
    sizes = [p.out_features for p in ups]
    if [p.in_features for p in downs] != sizes or (
        gates is not None and [p.out_features for p in gates] != sizes
    ):
        raise FFSplitError(f"{where}: up/gate/down parts cover different neuron ranges")
    down_bias = down_m.bias if isinstance(down_m, SplitInProjection | nn.Linear) else None
    if isinstance(down_m, nn.Linear):
        downs = [DenseLinear(down_m.weight)]
    extra = [p.bias_or_none() for p in downs if p.bias_or_none() is not None]
    if extra:
        down_bias = sum(extra, torch.zeros_like(extra[0]) if down_bias is None else down_bias)
    ranges = [
        _Range(u, gates[i] if gates is not None else None, dn)
        for i, (u, dn) in enumerate(zip(ups, downs, strict=True))
    ]
    return ranges, None if down_bias is None else down_bias.detach()


def fuse_projections(
    up: nn.Module,
    gate: nn.Module | None,
    down: nn.Module,
    activation: Callable[[Tensor], Tensor],
    backend: str = "auto",
    dtype: torch.dtype | None = None,
) -> FusedFFNCore | QuantFFNCore:
    """One FFN's fused core from its projection modules (split projections, parts or nn.Linear):
    ``core(x) == down(act(gate(x)) * up(x))`` (or ``down(act(up(x)))``). For benchmarks and tests;
    models go through :func:`fuse_model`."""
    ranges, down_bias = _ranges_of(up, gate, down, "fuse_projections")
    core = make_core(ranges, down_bias, activation, gate is not None, dtype)
    core.backend = backend
    return core


def make_core(
    ranges: list[_Range],
    down_bias: Tensor | None,
    activation: Callable[[Tensor], Tensor],
    gated: bool,
    dtype: torch.dtype | None,
) -> FusedFFNCore | QuantFFNCore:
    """The fused core of an FFN: ``QuantFFNCore`` when any range is quantized (every bit width,
    heavy bf16 or int8), else ``FusedFFNCore`` (dense and low-rank ranges). Column-outlier parts
    (the column-outlier baseline) have no fused form: fuse_model leaves such FFNs as they are."""
    if any(r.kind() == "column_outlier" for r in ranges):
        raise FFSplitError(
            "fuse: column-outlier parts (kept bf16 input columns) have no fused form"
        )
    if any(r.kind() == "quant" for r in ranges):
        return QuantFFNCore(ranges, down_bias, activation, gated, dtype)
    return FusedFFNCore(ranges, down_bias, activation, gated, dtype)


# --------------------------------------------------------------------------------------------
# The fused core
# --------------------------------------------------------------------------------------------


@dataclass
class FusePlan:
    """What one fused FFN holds (sizes after padding), for reports and tests."""

    d: int
    gated: bool
    activation: str | None
    heavy: int
    light: str  # "none" | "lowrank" | "quant"
    light_neurons: int = 0
    ranks: tuple[int, int, int] = (0, 0, 0)  # gate, up, down (padded)
    bits: int = 0
    group: int = 0
    notes: list[str] = field(default_factory=list)


class FusedFFNCore(nn.Module):
    """The fused weights of one FFN and its two stages (``first``, ``last``); see module doc."""

    def __init__(
        self,
        ranges: list[_Range],
        down_bias: Tensor | None,
        activation: Callable[[Tensor], Tensor],
        gated: bool,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        heavy = [r for r in ranges if r.kind() == "dense"]
        light = [r for r in ranges if r.kind() != "dense"]
        if len(light) > 1 or any(r.kind() != "lowrank" for r in light):
            raise FFSplitError(
                f"FusedFFNCore takes dense ranges plus one low-rank light range (quantized FFNs "
                f"are QuantFFNCore's), got {[r.kind() for r in ranges]}"
            )
        ref = ranges[0].up
        d = ref.in_features
        self.d, self.gated, self.act_module = d, gated, activation
        self.act_name = activation_name(activation)
        found, device = _float_dtype(ranges)
        dtype = dtype or found
        self.dtype = dtype
        self.light = light[0].kind() if light else "none"
        self.backend = "auto"  # "auto" | "torch" | "triton": which first/last runs on CUDA
        self.decode_tokens = DECODE_TOKENS
        # looked up once here: forward must stay traceable by torch.compile (no cached-function
        # calls or imports of new modules inside it)
        self._triton = _kernels_importable()
        if self._triton and device.type == "cuda":
            import ffsplit.kernels.ffn  # noqa: F401 - registers the custom ops before any tracing

        def cat(ts: list[Tensor], dim: int = 0) -> Tensor:
            return torch.cat([t.detach().to(dtype) for t in ts], dim)

        empty_rows = torch.zeros(0, d, dtype=dtype, device=device)

        # heavy (dense) neurons, padded to ALIGN
        m_heavy = sum(r.size for r in heavy)
        self.m_heavy = _pad_to(m_heavy, ALIGN)
        h_up = _pad_rows(
            cat([r.up.dense_weight() for r in heavy]) if heavy else empty_rows, self.m_heavy
        )
        rows = [h_up]
        biases: list[Tensor | None] = [_bias_cat([r.up for r in heavy], self.m_heavy, dtype)]
        if gated:
            h_gate = _pad_rows(
                cat([r.gate.dense_weight() for r in heavy]) if heavy else empty_rows, self.m_heavy
            )
            rows.insert(0, h_gate)
            biases.insert(0, _bias_cat([r.gate for r in heavy], self.m_heavy, dtype))
        w3_cols = [
            _pad_cols(
                cat([r.down.dense_weight() for r in heavy], 1) if heavy else h_up.new_zeros(d, 0),
                self.m_heavy,
            )
        ]

        self.r_gate = self.r_up = self.r_down = 0
        self.m_light = 0
        self.bits = self.group = 0
        light_bias: list[Tensor | None] = []
        if self.light == "lowrank":
            light_rows = self._init_lowrank(light[0], gated, dtype, device)
            rows += light_rows
            light_bias = [None] * len(light_rows)
            w3_cols.append(_pad_cols(light[0].down.a.detach().to(dtype), self.r_down))

        self._set_stacks(rows, biases + light_bias, w3_cols, down_bias, dtype, device)

    def _set_stacks(
        self,
        rows: list[Tensor],
        bias_list: list[Tensor | None],
        w3_cols: list[Tensor],
        down_bias: Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """w1/b1 (the first projections stacked), w3/b3 (the last), and the plan that says so."""
        self.w1 = nn.Parameter(torch.cat(rows).contiguous(), requires_grad=False)
        if any(b is not None for b in bias_list):
            full = [
                b if b is not None else torch.zeros(n, dtype=dtype, device=device)
                for b, n in zip(bias_list, [t.shape[0] for t in rows], strict=True)
            ]
            self.b1 = nn.Parameter(torch.cat(full), requires_grad=False)
        else:
            self.b1 = None
        self.w3 = nn.Parameter(torch.cat(w3_cols, 1).contiguous(), requires_grad=False)
        self.b3 = _param(down_bias, dtype)
        self.plan = FusePlan(
            d=self.d,
            gated=self.gated,
            activation=self.act_name,
            heavy=self.m_heavy,
            light=self.light,
            light_neurons=self.m_light,
            ranks=(self.r_gate, self.r_up, self.r_down),
            bits=self.bits,
            group=self.group,
        )

    def _init_lowrank(
        self, lr: _Range, gated: bool, dtype: torch.dtype, device: torch.device
    ) -> list[Tensor]:
        """The low-rank light factors; returns the rows it adds to w1 (B_gate, B_up)."""
        # light neurons padded too: [T, m_L] intermediates of the prefill path then have
        # 32-byte aligned rows (cuBLAS falls back to slow kernels otherwise)
        self.m_light = ml = _pad_to(lr.size, ALIGN)
        self.r_up = _pad_to(lr.up.rank, ALIGN)
        self.r_down = _pad_to(lr.down.rank, ALIGN)

        def factor_a(part: LowRankLinear, rank: int) -> nn.Parameter:
            return nn.Parameter(
                _pad_rows(_pad_cols(part.a.detach().to(dtype), rank), ml), requires_grad=False
            )

        def light_bias_of(part: LowRankLinear) -> nn.Parameter | None:
            bias = part.bias_or_none()
            return None if bias is None else _param(_pad_rows(bias.detach(), ml), dtype)

        b_up = _pad_rows(lr.up.b.detach().to(dtype), self.r_up)
        self.a_up = factor_a(lr.up, self.r_up)
        self.bias_up = light_bias_of(lr.up)
        light_rows = [b_up]
        if gated:
            self.r_gate = _pad_to(lr.gate.rank, ALIGN)
            light_rows.insert(0, _pad_rows(lr.gate.b.detach().to(dtype), self.r_gate))
            self.a_gate = factor_a(lr.gate, self.r_gate)
            self.bias_gate = light_bias_of(lr.gate)
            # the chain adds both light biases or none
            if self.bias_up is not None and self.bias_gate is None:
                self.bias_gate = _param(torch.zeros(ml, device=device), dtype)
            if self.bias_gate is not None and self.bias_up is None:
                self.bias_up = _param(torch.zeros(ml, device=device), dtype)
        else:
            self.a_gate, self.bias_gate = None, None
        self.b_down_t = nn.Parameter(
            _pad_rows(_pad_cols(lr.down.b.detach().to(dtype).t().contiguous(), self.r_down), ml),
            requires_grad=False,
        )
        return light_rows

    # ---------------------------------------------------------------------------- forward
    @property
    def hidden_features(self) -> int:
        """Width of the vector between ``first`` and ``last``."""
        extra = self.r_down if self.light == "lowrank" else self.m_light
        return self.m_heavy + extra

    def use_kernels(self, tokens: int, device: torch.device) -> bool:
        """Whether the Triton decode kernels run for this many tokens (static per shape)."""
        if self.backend == "torch" or device.type != "cuda" or self.act_name is None:
            return False
        if self.w1.dtype not in (torch.bfloat16, torch.float16) or not self._triton:
            return False
        limit = (
            DECODE_TOKENS if self.backend == "triton" else min(self.decode_tokens, DECODE_TOKENS)
        )
        return tokens <= limit

    def first(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.d)
        if x2.dtype == self.w1.dtype and self.use_kernels(x2.shape[0], x2.device):
            hidden = self._first_kernels(x2.contiguous())
        else:
            hidden = self._first_torch(x2)
        return hidden.view(*x.shape[:-1], hidden.shape[-1])

    def last(self, hidden: Tensor) -> Tensor:
        h2 = hidden.reshape(-1, hidden.shape[-1])
        # the kernel path's hidden is fp32 (the chain accumulates in it); the torch path's is not
        kernel_hidden = h2.dtype == torch.float32 and self.w1.dtype != torch.float32
        if kernel_hidden and self.use_kernels(h2.shape[0], h2.device):
            y = self._last_kernels(h2.contiguous())
        else:
            y = self._last_torch(h2)
        return y.view(*hidden.shape[:-1], self.d)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def _act(self, x: Tensor) -> Tensor:
        return self.act_module(x)

    def _first_torch(self, x: Tensor) -> Tensor:
        x = x.to(self.w1.dtype)
        y1 = nn.functional.linear(x, self.w1, self.b1)
        mh = self.m_heavy
        if self.gated:
            heavy = self._act(y1[:, :mh]) * y1[:, mh : 2 * mh]
            base = 2 * mh
        else:
            heavy = self._act(y1[:, :mh])
            base = mh
        if self.light == "none":
            return heavy
        if self.light == "lowrank":
            zu = y1[:, base + self.r_gate : base + self.r_gate + self.r_up]
            up = nn.functional.linear(zu, self.a_up, self.bias_up)
            if self.gated:
                gate = nn.functional.linear(
                    y1[:, base : base + self.r_gate], self.a_gate, self.bias_gate
                )
                h_light = self._act(gate) * up
            else:
                h_light = self._act(up)
            z_down = h_light @ self.b_down_t
            return torch.cat([heavy, z_down], dim=-1)
        raise FFSplitError(f"FusedFFNCore: unknown light kind {self.light!r}")

    def _last_torch(self, hidden: Tensor) -> Tensor:
        hidden = hidden.to(self.w3.dtype)
        k = self.w3.shape[1]
        return nn.functional.linear(hidden[:, :k], self.w3, self.b3)

    def _first_kernels(self, x: Tensor) -> Tensor:
        from ffsplit.kernels import ffn

        n_heavy_rows = (2 if self.gated else 1) * self.m_heavy
        lowrank = self.light == "lowrank"
        return ffn.fused_first(
            x,
            self.w1,
            self.b1[:n_heavy_rows] if self.b1 is not None else None,
            self.a_gate if lowrank else None,
            self.a_up if lowrank else None,
            self.bias_gate if lowrank else None,
            self.bias_up if lowrank else None,
            self.b_down_t if lowrank else None,
            None,  # the kernels' int4 light operands: quantized FFNs run in QuantFFNCore
            None,
            None,
            None,
            self.gated,
            self.act_name,
            self.light,
            self.m_heavy,
            self.r_gate,
            self.r_up,
            self.r_down,
            self.m_light,
            self.group or 64,
            self.hidden_features,
        )

    def _last_kernels(self, hidden: Tensor) -> Tensor:
        from ffsplit.kernels import ffn

        return ffn.fused_last(hidden, self.w3, self.b3, None, None, None, 0, 64)

    def nbytes(self) -> int:
        """Bytes of everything this core stores (weights, codes, scales, biases; padding counted)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


class QuantFFNCore(nn.Module):
    """Fused form of an FFN with quantized ranges (every variant the quant method writes).

    Neurons become *segments*: the dense ranges stacked into one bf16/fp16 segment (gate/up rows
    ``w_dense`` [2 m_dense, d], down rows ``w_down_t`` = W_down^T [m_dense, d]), then one segment
    per bit width (heavy int8, light widths mixed per layer by the budget solver), repacked into
    the kernels' layout (ffsplit/kernels/qlayout.py: same bytes as stored, padded to 16
    neurons). The hidden vector between ``first`` and ``last`` holds the segments side by side.
    Up to 16 tokens on a GPU two Triton launches do the FFN (ffsplit/kernels/qffn.py); above
    (prefill) cuBLAS GEMMs over weights dequantised chunk by chunk into a reused scratch buffer;
    on CPU the same math in torch (the reference).
    """

    def __init__(
        self,
        ranges: list[_Range],
        down_bias: Tensor | None,
        activation: Callable[[Tensor], Tensor],
        gated: bool,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from ffsplit.kernels import qlayout

        kinds = [r.kind() for r in ranges]
        if any(k not in ("dense", "quant") for k in kinds):
            raise FFSplitError(f"fuse: a quantized FFN with {kinds} ranges is not supported")
        d = ranges[0].up.in_features
        self.d, self.gated, self.act_module = d, gated, activation
        self.act_name = activation_name(activation)
        found, device = _float_dtype(ranges)
        self.dtype = dtype = dtype or found
        self.light = "quant"
        self.backend = "auto"
        self.decode_tokens = DECODE_TOKENS
        self._triton = _kernels_importable()
        if self._triton and device.type == "cuda":
            import ffsplit.kernels.qffn  # noqa: F401 - registers the custom ops before any tracing
        by_bits = _quant_ranges_by_bits(ranges, d)
        self.group = next(iter(by_bits.values()))[0].up.group_size
        dense = [r for r in ranges if r.kind() == "dense"]
        self.m_heavy = _segment_pad(sum(r.size for r in dense))
        self._init_dense(dense, dtype, device)
        column, segments = self.m_heavy, []
        biases = [_range_biases(dense, self.m_heavy, gated)]
        for bits in sorted(by_bits, reverse=True):  # heavy int8 first, then wider light codes
            group = by_bits[bits]
            block = _pack_block(group, bits, self.group, gated)
            segments.append((bits, block, column))
            biases.append(_range_biases(group, block.neurons, gated))
            column += block.neurons
        self.m_total = column
        self._register_segments(segments)
        self.bias_first = _stack_biases(biases, dtype, device)
        self.b3 = _param(down_bias, dtype)
        self.kernel_ok = qlayout.kernel_group_ok(self.group, d)
        self.bits = min(by_bits)
        self.plan = FusePlan(
            d=self.d,
            gated=self.gated,
            activation=self.act_name,
            heavy=self.m_heavy,
            light="quant",
            light_neurons=self.m_total - self.m_heavy,
            bits=self.bits,
            group=self.group,
            notes=[f"segments (bits, neurons): {[(b, blk.neurons) for b, blk, _ in segments]}"]
            + ([] if self.kernel_ok else [f"group {self.group}: no decode kernels (torch path)"]),
        )

    def _init_dense(self, dense: list[_Range], dtype: torch.dtype, device: torch.device) -> None:
        self.w_dense: nn.Parameter | None = None
        self.w_down_t: nn.Parameter | None = None
        if not dense:
            return
        rows = [_pad_rows(torch.cat([r.up.dense_weight().to(dtype) for r in dense]), self.m_heavy)]
        if self.gated:
            gate = torch.cat([r.gate.dense_weight().to(dtype) for r in dense])
            rows.insert(0, _pad_rows(gate, self.m_heavy))
        self.w_dense = _param(torch.cat(rows).contiguous(), dtype)
        down = torch.cat([r.down.dense_weight().to(dtype) for r in dense], 1)  # [d, m_dense]
        self.w_down_t = _param(_pad_rows(down.t().contiguous(), self.m_heavy), dtype)

    def _register_segments(self, segments: list[tuple[int, Any, int]]) -> None:
        """Buffers seg{i}_* (so .to() moves them and module_bytes counts them) and the plain
        description the kernels take."""
        self._segment_meta: list[tuple[int, int, int, int, int, int]] = []
        for i, (bits, block, column) in enumerate(segments):
            for j, t in enumerate(block.first):
                self.register_buffer(f"seg{i}_first{j}", t)
            for j, t in enumerate(block.down):
                self.register_buffer(f"seg{i}_down{j}", t)
            for name in ("first_scales", "first_zeros", "down_scales", "down_zeros"):
                self.register_buffer(f"seg{i}_{name}", getattr(block, name))
            self._segment_meta.append(
                (bits, block.per_unit, len(block.first), block.neurons, column, len(block.down))
            )

    def segments(self) -> list[Any]:
        """The segments as ffsplit.kernels.qffn.Segment-shaped tuples of this module's buffers."""
        from ffsplit.kernels.qlayout import QuantBlock

        out = []
        for i, (bits, _, n_first, neurons, column, n_down) in enumerate(self._segment_meta):
            block = QuantBlock(
                bits=bits,
                group=self.group,
                neurons=neurons,
                first=[getattr(self, f"seg{i}_first{j}") for j in range(n_first)],
                first_scales=getattr(self, f"seg{i}_first_scales"),
                first_zeros=getattr(self, f"seg{i}_first_zeros"),
                down=[getattr(self, f"seg{i}_down{j}") for j in range(n_down)],
                down_scales=getattr(self, f"seg{i}_down_scales"),
                down_zeros=getattr(self, f"seg{i}_down_zeros"),
            )
            out.append((block, column))
        return out

    def _op_args(self) -> tuple[list[Tensor], list[int]]:
        tensors: list[Tensor] = []
        ints: list[int] = [len(self._segment_meta)]
        for block, column in self.segments():
            tensors += [*block.first, block.first_scales, block.first_zeros]
            tensors += [*block.down, block.down_scales, block.down_zeros]
            ints += [
                block.bits,
                block.per_unit,
                len(block.first),
                block.neurons,
                column,
                len(block.down),
            ]
        return tensors, ints

    # ---------------------------------------------------------------------------- forward
    @property
    def hidden_features(self) -> int:
        return self.m_total

    def use_kernels(self, tokens: int, device: torch.device) -> bool:
        """Whether the Triton decode kernels run for this many tokens (static per shape)."""
        if self.backend == "torch" or device.type != "cuda" or self.act_name is None:
            return False
        if self.dtype not in (torch.bfloat16, torch.float16) or not self._triton:
            return False
        limit = (
            DECODE_TOKENS if self.backend == "triton" else min(self.decode_tokens, DECODE_TOKENS)
        )
        return self.kernel_ok and tokens <= limit

    def use_triton_prefill(self, device: torch.device) -> bool:
        """Prefill dequantises with a Triton kernel on CUDA (torch ops elsewhere)."""
        return (
            self.backend != "torch"
            and device.type == "cuda"
            and self._triton
            and self.kernel_ok
            and self.act_name is not None
        )

    def first(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.d)
        if x2.dtype == self.dtype and self.use_kernels(x2.shape[0], x2.device):
            hidden = self._first_kernels(x2.contiguous())
        else:
            hidden = self._first_torch(x2)
        return hidden.view(*x.shape[:-1], hidden.shape[-1])

    def last(self, hidden: Tensor) -> Tensor:
        h2 = hidden.reshape(-1, hidden.shape[-1])
        kernel_hidden = h2.dtype == torch.float32 and self.dtype != torch.float32
        if kernel_hidden and self.use_kernels(h2.shape[0], h2.device):
            y = self._last_kernels(h2.contiguous())
        else:
            y = self._last_torch(h2)
        return y.view(*hidden.shape[:-1], self.d)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def _first_kernels(self, x: Tensor) -> Tensor:
        from ffsplit.kernels import qffn

        tensors, ints = self._op_args()
        return qffn.qffn_first(
            x,
            self.w_dense,
            self.bias_first,
            tensors,
            ints,
            self.gated,
            self.act_name,
            self.m_total,
            self.group,
        )

    def _last_kernels(self, hidden: Tensor) -> Tensor:
        from ffsplit.kernels import qffn

        tensors, ints = self._op_args()
        return qffn.qffn_last(
            hidden, self.w_down_t, self.b3, tensors, ints, self.d, self.group, self.dtype
        )

    def _first_torch(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.use_triton_prefill(x.device):
            from ffsplit.kernels import qffn

            tensors, ints = self._op_args()
            return qffn.qffn_prefill_first(
                x,
                self.w_dense,
                self.bias_first,
                tensors,
                ints,
                self.gated,
                self.act_name,
                self.m_total,
                self.group,
            )
        return self._first_reference(x)

    def _last_torch(self, hidden: Tensor) -> Tensor:
        hidden = hidden.to(self.dtype)
        if self.use_triton_prefill(hidden.device):
            from ffsplit.kernels import qffn

            tensors, ints = self._op_args()
            return qffn.qffn_prefill_last(
                hidden, self.w_down_t, self.b3, tensors, ints, self.d, self.group
            )
        return self._last_reference(hidden)

    def first_weights(self) -> Tensor:
        """All gate/up rows dequantised in hidden order, [(2 if gated) * m_total, d] (float32):
        gate rows of every neuron, then up rows (reference path and tests)."""
        from ffsplit.kernels.qlayout import dequantize_first

        per = 2 if self.gated else 1
        parts: list[list[Tensor]] = [[] for _ in range(per)]
        if self.w_dense is not None:
            for i, chunk in enumerate(self.w_dense.float().chunk(per)):
                parts[i].append(chunk)
        for block, _ in self.segments():
            for i, chunk in enumerate(dequantize_first(block).chunk(per)):
                parts[i].append(chunk)
        return torch.cat([torch.cat(p) for p in parts])

    def down_weights_t(self) -> Tensor:
        """W_down^T of every neuron in hidden order, [m_total, d] (float32)."""
        from ffsplit.kernels.qlayout import dequantize_down

        parts = [] if self.w_down_t is None else [self.w_down_t.float()]
        parts += [dequantize_down(block) for block, _ in self.segments()]
        return torch.cat(parts)

    def _first_reference(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.first_weights().to(x.dtype))
        m = self.m_total
        if self.bias_first is not None:
            y = y + self.bias_first.reshape(-1)
        if self.gated:
            return self.act_module(y[:, :m]) * y[:, m:]
        return self.act_module(y)

    def _last_reference(self, hidden: Tensor) -> Tensor:
        y = hidden @ self.down_weights_t().to(hidden.dtype)
        return y if self.b3 is None else y + self.b3

    def nbytes(self) -> int:
        """Bytes of everything this core stores (weights, codes, scales, biases; padding counted)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _quant_ranges_by_bits(ranges: list[_Range], d: int) -> dict[int, list[_Range]]:
    """The quantized ranges grouped by bit width (each range's up/gate/down share one width and
    the FFN one group size; down neuron-major, up/gate not: the quant recipe's layout)."""
    from ffsplit.kernels.qlayout import KERNEL_BITS

    out: dict[int, list[_Range]] = {}
    groups = set()
    for r in ranges:
        if r.kind() != "quant":
            continue
        parts = [p for p in (r.up, r.gate, r.down) if p is not None]
        bits = {p.bits for p in parts}
        groups |= {p.group_size for p in parts}
        if len(bits) != 1 or next(iter(bits)) not in KERNEL_BITS:
            raise FFSplitError(
                f"fuse: a quantized range with bits {sorted(bits)} (need one of {KERNEL_BITS})"
            )
        if r.down.neuron_major is False or any(
            p.neuron_major for p in (r.up, r.gate) if p is not None
        ):
            raise FFSplitError(
                "fuse: quantized parts must be neuron-major for down, row-major for up/gate"
            )
        if r.down.bias_or_none() is not None:
            raise FFSplitError("fuse: a quantized down part with its own bias is not supported")
        out.setdefault(next(iter(bits)), []).append(r)
    if len(groups) != 1:
        raise FFSplitError(
            f"fuse: quantized parts of one FFN must share a group size, got {sorted(groups)}"
        )
    return out


def _segment_pad(n: int) -> int:
    return _pad_to(n, QUANT_BLOCK_PAD if n >= QUANT_WHOLE else ALIGN)


def _pack_block(ranges: list[_Range], bits: int, group: int, gated: bool) -> Any:
    """One segment's kernel layout from its ranges: 2/4/8-bit streams taken as they are stored
    (4 bits with each unit's nibbles moved to their slots), other widths unpacked and repacked
    into planes."""
    from ffsplit.kernels import qlayout

    n = sum(r.size for r in ranges)
    padded = _segment_pad(n)

    def rows_of(parts: list[QuantizedLinear]) -> tuple[list[Tensor], Tensor, Tensor]:
        qs = [p.quantized() for p in parts]
        if bits in (2, 4, 8):  # one plane: the stored stream read as int32 (qlayout)
            stream = torch.cat([q.packed.view(torch.int32).view(q.shape[0], -1) for q in qs])
            units = [qlayout.units_from_stream(stream, bits)]
        else:
            units = qlayout.pack_units(torch.cat([codes(q) for q in qs]), bits)
        return (
            [_pad_rows(u, padded) for u in units],
            _pad_rows(torch.cat([q.scales for q in qs]), padded),
            _pad_rows(torch.cat([q.zeros for q in qs]), padded),
        )

    projections = ([[r.gate for r in ranges]] if gated else []) + [[r.up for r in ranges]]
    first = [rows_of(parts) for parts in projections]
    down_units, down_scales, down_zeros = rows_of([r.down for r in ranges])
    per_unit = qlayout.CODES_PER_UNIT[bits]
    return qlayout.QuantBlock(
        bits=bits,
        group=group,
        neurons=padded,
        first=[torch.cat(p).contiguous() for p in zip(*[f[0] for f in first], strict=True)],
        first_scales=torch.cat([f[1] for f in first]).contiguous(),
        first_zeros=torch.cat([f[2] for f in first]).contiguous(),
        down=[qlayout.group_major(u, group, per_unit) for u in down_units],
        down_scales=down_scales.t().contiguous(),
        down_zeros=down_zeros.t().contiguous(),
    )


def _range_biases(
    ranges: list[_Range], padded: int, gated: bool
) -> tuple[int, list[Tensor | None]]:
    """(padded neuron count, [gate bias, up bias] or [up bias]) of these ranges; None where no
    part has one."""
    projections = (["gate"] if gated else []) + ["up"]
    out: list[Tensor | None] = []
    for name in projections:
        parts = [getattr(r, name) for r in ranges]
        biases = [p.bias_or_none() for p in parts]
        if all(b is None for b in biases):
            out.append(None)
            continue
        ref = next(b for b in biases if b is not None)
        full = torch.cat(
            [
                b.detach().to(ref.dtype) if b is not None else ref.new_zeros(p.out_features)
                for b, p in zip(biases, parts, strict=True)
            ]
        )
        out.append(torch.cat([full, full.new_zeros(padded - full.shape[0])]))
    return padded, out


def _stack_biases(
    per_segment: list[tuple[int, list[Tensor | None]]],
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Parameter | None:
    """[2, m_total] gate/up biases (or [1, m_total]) over all segments; None if none has one."""
    if all(b is None for _, seg in per_segment for b in seg):
        return None
    rows = []
    for i in range(len(per_segment[0][1])):
        pieces = [
            seg[i].to(device=device, dtype=dtype)
            if seg[i] is not None
            else torch.zeros(size, device=device, dtype=dtype)
            for size, seg in per_segment
        ]
        rows.append(torch.cat(pieces))
    return nn.Parameter(torch.stack(rows).contiguous(), requires_grad=False)


def _float_dtype(ranges: list[_Range]) -> tuple[torch.dtype, torch.device]:
    """Compute dtype and device of an FFN: those of its first float weight (int4-only FFNs have
    none: float32 unless the caller names the model's dtype)."""
    device = None
    for r in ranges:
        for p in (r.up, r.gate, r.down):
            if p is None:
                continue
            for t in p.parameters():
                if t.is_floating_point():
                    return t.dtype, t.device
            for t in p.buffers():
                device = device or t.device
    return torch.float32, device or torch.device("cpu")


def _param(t: Tensor | None, dtype: torch.dtype) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().to(dtype).clone(), requires_grad=False)


def _bias_cat(parts: list[LinearPart], rows: int, dtype: torch.dtype) -> Tensor | None:
    biases = [p.bias_or_none() for p in parts]
    if all(b is None for b in biases):
        return None
    device = next(b for b in biases if b is not None).device
    out = torch.cat(
        [
            b.detach().to(dtype)
            if b is not None
            else torch.zeros(p.out_features, dtype=dtype, device=device)
            for b, p in zip(biases, parts, strict=True)
        ]
    )
    return torch.cat([out, out.new_zeros(rows - out.shape[0])])


def _kernels_importable() -> bool:
    from ffsplit.kernels import triton_available

    return triton_available()


# --------------------------------------------------------------------------------------------
# Modules that go into the model
# --------------------------------------------------------------------------------------------


class FusedFFN(nn.Module):
    """Replaces a gated FFN container whose forward is down(act(gate(x)) * up(x))."""

    def __init__(self, core: FusedFFNCore | QuantFFNCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        return self.core(x)


class FusedFirst(nn.Module):
    """Replaces up of a non-gated FFN: outputs the compact hidden vector (activation included)."""

    def __init__(self, core: FusedFFNCore | QuantFFNCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        return self.core.first(x)


class FusedLast(nn.Module):
    """Replaces down of a non-gated FFN; shares the core registered in ``FusedFirst``."""

    def __init__(self, core: FusedFFNCore | QuantFFNCore) -> None:
        super().__init__()
        object.__setattr__(self, "_core", core)  # not registered: its weights live in FusedFirst

    def forward(self, hidden: Tensor) -> Tensor:
        return self._core.last(hidden)


# --------------------------------------------------------------------------------------------
# fuse_model
# --------------------------------------------------------------------------------------------


@dataclass
class FuseReport:
    """Per FFN: the plan it got, or why it was left on the reference path."""

    fused: dict[int, FusePlan] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    dataflow: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataflow": self.dataflow,
            "fused": {k: vars(v) for k, v in self.fused.items()},
            "skipped": dict(self.skipped),
        }


def dataflow_of(adapter: Adapter, handle: FFNHandle) -> str:
    """The adapter's declared FFN dataflow (``Adapter.ffn_dataflow``), else the usual one for its
    layout: gated with its own container -> "gated_mlp"; non-gated -> "up_act_down". Every swap is
    verified on a probe, so a wrong guess fails loudly instead of computing something else."""
    declared = getattr(adapter, "ffn_dataflow", None)
    if declared is not None:
        if declared not in DATAFLOWS:
            raise FFSplitError(
                f"adapter '{adapter.name}': ffn_dataflow {declared!r} not in {DATAFLOWS}"
            )
        return declared
    if handle.gated:
        return "gated_mlp"
    return "up_act_down"


def _activation_path(adapter: Adapter, handle: FFNHandle) -> str:
    if not handle.up_path.endswith(adapter.up):
        raise FFSplitError(f"layer {handle.layer}: cannot locate the activation module")
    return handle.up_path[: len(handle.up_path) - len(adapter.up)] + adapter.activation


@torch.no_grad()
def _check(
    reference: Callable[[Tensor], Tensor], core: FusedFFNCore | QuantFFNCore, layer: int
) -> None:
    """The fused core must compute what the modules it replaces compute, on a random probe,
    through the torch path and (on a GPU) the decode-kernel path."""
    generator = torch.Generator(device="cpu").manual_seed(1234 + layer)
    device = next(itertools.chain(core.parameters(), core.buffers())).device
    x = torch.randn(3, core.d, generator=generator).to(device=device, dtype=core.dtype)
    want = reference(x).float()
    tol = 1e-4 if core.dtype == torch.float32 else 3e-2
    backend = core.backend
    paths = ["torch"] + (["auto"] if core.use_kernels(x.shape[0], x.device) else [])
    try:
        for path in paths:
            core.backend = path
            got = core(x).float()
            err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
            if not math.isfinite(err) or err > tol:
                raise FFSplitError(
                    f"layer {layer}: fused FFN ({path} path) differs from the model's FFN on a "
                    f"probe (relative error {err:.3g} > {tol}); the adapter's ffn_dataflow does "
                    f"not describe this FFN"
                )
    finally:
        core.backend = backend


@torch.no_grad()
def fuse_model(
    model: nn.Module,
    adapter: Adapter | None = None,
    *,
    backend: str = "auto",
    verify: bool = True,
    strict: bool = False,
) -> FuseReport:
    """Convert a (split or dense) model's FFNs to the fused execution form, in place.

    backend: "auto" (Triton at <= 16 tokens on CUDA, torch ops otherwise), "torch", "triton".
    FFNs the fused form cannot express are left as they are (reported), or raise if ``strict``.
    """
    if backend not in ("auto", "torch", "triton"):
        raise FFSplitError(f"fuse_model: backend {backend!r} must be auto, torch or triton")
    if adapter is None:
        from ffsplit.adapters.registry import get_adapter

        adapter = get_adapter(model)
    report = FuseReport()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for handle in adapter.ffns(model):
        flow = dataflow_of(adapter, handle)
        report.dataflow = flow
        try:
            ranges, down_bias = _ranges(adapter, model, handle)
            core = make_core(ranges, down_bias, handle.activation, handle.gated, dtype)
        except FFSplitError as exc:
            if strict:
                raise
            report.skipped[handle.layer] = str(exc)
            continue
        core.backend = backend
        if flow == "gated_mlp":
            if not handle.gated:
                raise FFSplitError(f"layer {handle.layer}: gated_mlp dataflow on a non-gated FFN")
            container = model.get_submodule(handle.path)
            if verify:
                _check(container, core, handle.layer)
            fused = FusedFFN(core)
            # keep the activation where the adapter looks for it, so adapter.ffns() still works
            act_path = _activation_path(adapter, handle)
            if act_path.startswith(handle.path + ".") and _is_module(model, act_path):
                fused.add_module(act_path[len(handle.path) + 1 :], model.get_submodule(act_path))
            _set_module(model, handle.path, fused)
        else:
            if handle.gated:
                raise FFSplitError(f"layer {handle.layer}: up_act_down dataflow on a gated FFN")
            up = model.get_submodule(handle.up_path)
            down = model.get_submodule(handle.down_path)
            act_path = _activation_path(adapter, handle)
            act = (
                model.get_submodule(act_path) if _is_module(model, act_path) else handle.activation
            )
            if verify:
                _check(lambda x, u=up, a=act, dn=down: dn(a(u(x))), core, handle.layer)
            first = FusedFirst(core)
            _set_module(model, handle.up_path, first)
            _set_module(model, act_path, nn.Identity())
            _set_module(model, handle.down_path, FusedLast(core))
        report.fused[handle.layer] = core.plan
    if report.skipped:
        warnings.warn(
            f"fuse_model: {len(report.skipped)} FFN(s) left on the reference path: "
            f"{next(iter(report.skipped.values()))}",
            stacklevel=2,
        )
    return report


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _is_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
