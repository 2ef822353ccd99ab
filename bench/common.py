"""Shared pieces of the speed benchmarks: pinned shapes, random split FFNs, timing, machine record.

Random weights at real shapes are valid for speed (speed does not depend on weight values); every
benchmark compares against the dense baseline measured in the same run (style.md, 10). Needs only
ffsplit core + torch (+ transformers for whole models): it runs on the GPU machine too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.compress.budget import FFNShape, lowrank_bytes, solve_rank
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import DenseLinear, LowRankLinear, QuantizedLinear
from ffsplit.split.qformat import QuantizedTensor

RESULTS = Path(__file__).parent / "results"
# Ceilings used for roofline ratios (H200, measured on this workplace's machines: KINDS.md /
# gpu.md). Ratios of floors only need them where bytes and FLOPs both matter (128 tokens).
HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS_PER_S = 790e12
ALIGN = 16  # fused.py pads ranks and heavy counts to this; solved ranks are rounded down to it


@dataclass(frozen=True)
class FFNSpec:
    """One FFN shape: hidden d, m neurons, gated or not, activation, biases (OPT has them)."""

    name: str
    d: int
    m: int
    gated: bool
    act: str
    bias: bool = False

    @property
    def budget_shape(self) -> FFNShape:
        return FFNShape(
            d=self.d, m=self.m, gated=self.gated, up_bias=self.bias, down_bias=self.bias
        )

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2


# 7B-class shapes and the small real models' shapes (configs of the public checkpoints).
FFN_SHAPES = {
    "llama2-7b": FFNSpec("llama2-7b", 4096, 11008, True, "silu"),
    "llama3-8b": FFNSpec("llama3-8b", 4096, 14336, True, "silu"),
    "mistral-7b": FFNSpec("mistral-7b", 4096, 14336, True, "silu"),
    "opt-6.7b": FFNSpec("opt-6.7b", 4096, 16384, False, "relu", bias=True),
    "smollm2-135m": FFNSpec("smollm2-135m", 576, 1536, True, "silu"),
    "gemma3-270m": FFNSpec("gemma3-270m", 640, 2048, True, "gelu_tanh"),
}

_ACT = {
    "silu": nn.SiLU(),
    "relu": nn.ReLU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
}


class MLP(nn.Module):
    """The stock HF FFN container (LlamaMLP / GemmaMLP forward; OPT's fc1 -> act -> fc2)."""

    def __init__(
        self, up: nn.Module, gate: nn.Module | None, down: nn.Module, act: nn.Module
    ) -> None:
        super().__init__()
        self.up_proj, self.gate_proj, self.down_proj, self.act_fn = up, gate, down, act

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _randn(*shape: int, device: torch.device, dtype: torch.dtype, std: float) -> Tensor:
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(std).to(dtype)


def dense_mlp(spec: FFNSpec, device: torch.device, dtype: torch.dtype) -> MLP:
    def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
        layer = nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype)
        layer.weight.data = _randn(n_out, n_in, device=device, dtype=dtype, std=n_in**-0.5)
        if bias:
            layer.bias.data = _randn(n_out, device=device, dtype=dtype, std=0.02)
        return layer.requires_grad_(False)

    gate = linear(spec.d, spec.m, False) if spec.gated else None
    return MLP(
        linear(spec.d, spec.m, spec.bias), gate, linear(spec.m, spec.d, spec.bias), _ACT[spec.act]
    ).eval()


@dataclass(frozen=True)
class Recipe:
    """How a benchmark variant is split: heavy ratio, light kind, and its rank or bits."""

    name: str
    heavy_ratio: float
    light: str  # "lowrank" | "quant" | "none" (pruned)
    reduction: float | None = None  # FFN byte reduction target (low-rank rank is solved from it)
    bits: int = 4
    group: int = 128

    def heavy(self, spec: FFNSpec) -> int:
        return math.ceil(self.heavy_ratio * spec.m)

    def rank(self, spec: FFNSpec) -> int:
        """The budget solver's rank (largest meeting the reduction), rounded down to ALIGN."""
        if self.light != "lowrank" or self.reduction is None:
            return 0
        rank = solve_rank(spec.budget_shape, self.heavy(spec), self.reduction)
        return max(ALIGN, rank // ALIGN * ALIGN)

    def describe(self, spec: FFNSpec) -> dict[str, Any]:
        out = {
            "name": self.name,
            "heavy_ratio": self.heavy_ratio,
            "heavy": self.heavy(spec),
            "light": self.light,
            "target_ffn_reduction": self.reduction,
        }
        if self.light == "lowrank":
            out["rank"] = self.rank(spec)
        if self.light == "quant":
            out.update(bits=self.bits, group=self.group)
        return out


def split_projections(
    spec: FFNSpec,
    recipe: Recipe,
    device: torch.device,
    dtype: torch.dtype,
    dense: MLP | None = None,
) -> tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection]:
    """Split projections of the recipe's structure: the heavy rows taken from ``dense`` (or random),
    the light part random factors / random int4 codes of the right shapes (valid for speed)."""
    heavy = recipe.heavy(spec)
    light = spec.m - heavy
    d = spec.d

    def heavy_rows(module: nn.Module | None, rows: int, bias: bool) -> DenseLinear:
        if module is not None:
            b = module.bias[:rows] if module.bias is not None else None
            return DenseLinear(module.weight[:rows], b)
        w = _randn(rows, d, device=device, dtype=dtype, std=d**-0.5)
        return DenseLinear(w, _randn(rows, device=device, dtype=dtype, std=0.02) if bias else None)

    def light_out(bias: bool) -> nn.Module:
        b = _randn(light, device=device, dtype=dtype, std=0.02) if bias else None
        if recipe.light == "lowrank":
            r = recipe.rank(spec)
            return LowRankLinear(
                _randn(light, r, device=device, dtype=dtype, std=r**-0.5),
                _randn(r, d, device=device, dtype=dtype, std=d**-0.5),
                b,
            )
        return QuantizedLinear(_random_quant(light, d, recipe, device), False, b)

    def out_projection(module: nn.Module | None, bias: bool) -> SplitOutProjection:
        parts = [heavy_rows(module, heavy, bias)] if heavy else []
        if recipe.light != "none" and light:
            parts.append(light_out(bias))
        return SplitOutProjection(parts)

    up = out_projection(dense.up_proj if dense else None, spec.bias)
    gate = out_projection(dense.gate_proj if dense else None, False) if spec.gated else None
    down_parts = []
    if heavy:
        w = (
            dense.down_proj.weight[:, :heavy]
            if dense
            else _randn(d, heavy, device=device, dtype=dtype, std=spec.m**-0.5)
        )
        down_parts.append(DenseLinear(w))
    if recipe.light != "none" and light:
        if recipe.light == "lowrank":
            r = recipe.rank(spec)
            down_parts.append(
                LowRankLinear(
                    _randn(d, r, device=device, dtype=dtype, std=r**-0.5),
                    _randn(r, light, device=device, dtype=dtype, std=spec.m**-0.5),
                )
            )
        else:
            down_parts.append(QuantizedLinear(_random_quant(light, d, recipe, device), True))
    bias = None
    if spec.bias:
        bias = dense.down_proj.bias if dense else _randn(d, device=device, dtype=dtype, std=0.02)
    return up, gate, SplitInProjection(down_parts, bias)


def _random_quant(rows: int, cols: int, recipe: Recipe, device: torch.device) -> QuantizedTensor:
    """Random codes with small scales (values like a trained matrix's): valid for speed."""
    gen_bytes = rows * cols * recipe.bits // 8
    packed = torch.randint(0, 256, (gen_bytes,), device=device, dtype=torch.uint8)
    groups = cols // recipe.group
    scales = torch.full(
        (rows, groups), 2.0 / (cols**0.5 * (1 << recipe.bits)), device=device, dtype=torch.float16
    )
    zeros = (-scales.float() * (1 << (recipe.bits - 1))).to(torch.float16)
    return QuantizedTensor(packed, scales, zeros, recipe.bits, recipe.group, (rows, cols))


def split_mlp(
    spec: FFNSpec,
    recipe: Recipe,
    device: torch.device,
    dtype: torch.dtype,
    dense: MLP | None = None,
) -> MLP:
    up, gate, down = split_projections(spec, recipe, device, dtype, dense)
    return MLP(up, gate, down, _ACT[spec.act]).eval()


def module_bytes(module: nn.Module) -> int:
    """Stored bytes of a module's parameters and persistent buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def ffn_flops(spec: FFNSpec, recipe: Recipe | None, tokens: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one FFN call; int4 light parts do dense FLOPs."""
    n = spec.matrices
    if recipe is None or recipe.light == "quant":
        return 2 * tokens * n * spec.m * spec.d
    heavy = recipe.heavy(spec)
    light = spec.m - heavy
    flops = n * heavy * spec.d
    if recipe.light == "lowrank":
        flops += n * recipe.rank(spec) * (light + spec.d)
    return 2 * tokens * flops


def lowrank_ffn_bytes(spec: FFNSpec, recipe: Recipe) -> int:
    return lowrank_bytes(spec.budget_shape, recipe.heavy(spec), recipe.rank(spec))


# ------------------------------------------------------------------------------------ timing


def capture_graph(fn: Callable[[], Any], warmup: int) -> tuple[torch.cuda.CUDAGraph, float]:
    """``fn`` captured in a CUDA graph after ``warmup`` calls on a side stream (allocations made
    before capture, as PyTorch's CUDA graph docs do); returns the graph and the warm-up's wall
    seconds (torch.compile's compile time, when ``fn`` compiles on its first call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    started = time.time()
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    warmup_s = time.time() - started
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph, warmup_s


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay over ``replays`` back-to-back replays, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def graph_time_ms(
    fn: Callable[[], Any], calls_per_replay: int = 1, trials: int = 7, min_trial_ms: float = 20.0
) -> float:
    """Median milliseconds per call of ``fn`` captured in a CUDA graph (replays timed with
    events; method: warm-up, then several trials of many replays, median over trials)."""
    graph, _ = capture_graph(fn, warmup=3)
    graph.replay()
    torch.cuda.synchronize()
    once = max(replay_ms(graph, 1), 1e-3)
    replays = max(1, min(2000, int(min_trial_ms / once)))
    times = [replay_ms(graph, replays) / calls_per_replay for _ in range(trials)]
    del graph
    return statistics.median(times)


def event_time_ms(fn: Callable[[], Any], warmup: int = 2, trials: int = 5) -> float:
    """Median milliseconds of eager calls (large kernels: prefill), timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], Any], warmup: int = 1, trials: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------- recording


def machine() -> dict[str, Any]:
    """What ran the benchmark: host, device, library versions, command, commit."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
        info["threads"] = torch.get_num_threads()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        info["worktree_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------ quant variants


@dataclass(frozen=True)
class QuantRecipe:
    """A quant variant as the recipe writes it: heavy neurons at ``heavy_bits`` (16 = bf16 kept
    dense, 8 = int8), light neurons at one width, or two adjacent widths solved from a target
    FFN reduction (compress/budget.py solve_light_bits, the recipe's ladder); groups along d."""

    name: str
    heavy_ratio: float
    heavy_bits: int = 16
    light_bits: int | None = 4  # one width for every light neuron
    reduction: float | None = None  # else: solve a two-width mix for this FFN reduction
    group: int = 64  # QuantConfig's default group size
    # else: the light neurons over these (width, share) pairs, as the layer allocation gives them
    shares: tuple[tuple[int, float], ...] = ()

    def heavy(self, spec: FFNSpec) -> int:
        return math.ceil(self.heavy_ratio * spec.m)

    def light_counts(self, spec: FFNSpec) -> dict[int, int]:
        light = spec.m - self.heavy(spec)
        if self.shares:
            counts = {b: round(share * light) for b, share in self.shares}
            widest = max(counts, key=counts.__getitem__)
            counts[widest] += light - sum(counts.values())
            return {b: n for b, n in counts.items() if n}
        if self.reduction is None:
            return {self.light_bits: light} if light else {}
        from ffsplit.compress.budget import solve_light_bits

        return solve_light_bits(
            spec.budget_shape, self.heavy(spec), self.heavy_bits, self.reduction, self.group
        )

    def nbytes(self, spec: FFNSpec) -> int:
        from ffsplit.compress.budget import quant_bytes

        counts = self.light_counts(spec)
        return quant_bytes(spec.budget_shape, self.heavy(spec), self.heavy_bits, counts, self.group)

    def describe(self, spec: FFNSpec) -> dict[str, Any]:
        return {
            "name": self.name,
            "heavy_ratio": self.heavy_ratio,
            "heavy": self.heavy(spec),
            "heavy_bits": self.heavy_bits,
            "light_bits": {str(b): n for b, n in self.light_counts(spec).items()},
            "group": self.group,
            "target_ffn_reduction": self.reduction,
        }


def _random_codes(
    rows: int, cols: int, bits: int, group: int, device: torch.device
) -> QuantizedTensor:
    packed = torch.randint(
        0, 256, ((rows * cols * bits + 7) // 8,), device=device, dtype=torch.uint8
    )
    groups = cols // group
    scales = torch.full(
        (rows, groups), 2.0 / (cols**0.5 * (1 << bits)), device=device, dtype=torch.float16
    )
    zeros = (-scales.float() * (1 << (bits - 1))).to(torch.float16)
    return QuantizedTensor(packed, scales, zeros, bits, group, (rows, cols))


def quant_split_projections(
    spec: FFNSpec, recipe: QuantRecipe, device: torch.device, dtype: torch.dtype
) -> tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection]:
    """Split projections of the recipe's structure with random values (valid for speed): heavy
    rows dense (or int8), then one range per light width, higher widths first (as recipe.py)."""
    d = spec.d
    ranges = [(recipe.heavy(spec), recipe.heavy_bits)] if recipe.heavy(spec) else []
    ranges += sorted(((n, b) for b, n in recipe.light_counts(spec).items()), key=lambda r: -r[1])

    def out_part(n: int, bits: int, bias: bool) -> nn.Module:
        b = _randn(n, device=device, dtype=dtype, std=0.02) if bias else None
        if bits == 16:
            return DenseLinear(_randn(n, d, device=device, dtype=dtype, std=d**-0.5), b)
        return QuantizedLinear(_random_codes(n, d, bits, recipe.group, device), False, b)

    def down_part(n: int, bits: int) -> nn.Module:
        if bits == 16:
            return DenseLinear(_randn(d, n, device=device, dtype=dtype, std=spec.m**-0.5))
        return QuantizedLinear(_random_codes(n, d, bits, recipe.group, device), True)

    up = SplitOutProjection([out_part(n, b, spec.bias) for n, b in ranges])
    gate = SplitOutProjection([out_part(n, b, False) for n, b in ranges]) if spec.gated else None
    bias = _randn(d, device=device, dtype=dtype, std=0.02) if spec.bias else None
    return up, gate, SplitInProjection([down_part(n, b) for n, b in ranges], bias)


def quant_split_mlp(
    spec: FFNSpec, recipe: QuantRecipe, device: torch.device, dtype: torch.dtype
) -> MLP:
    up, gate, down = quant_split_projections(spec, recipe, device, dtype)
    return MLP(up, gate, down, _ACT[spec.act]).eval()
