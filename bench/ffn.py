"""FFN-layer benchmark: dense bf16 FFN against split FFNs in the fused execution form.

Workload pinned here (style.md, 10): 7B-class FFN shapes (Llama-2-7B, Llama-3-8B, Mistral-7B,
OPT-6.7B) and the small real models' shapes (SmolLM2-135M, Gemma3-270M), 1/16/128/2048 tokens,
bf16, random weights (valid for speed). Each FFN is timed inside a CUDA graph (the decode setting:
no launch gaps from Python), over enough independent weight copies that they do not fit in L2,
so every call streams its weights from HBM as a layer of a real model would.

Variants: dense (stock HF MLP: gate, up, act, mul, down), dense-fused (the same weights through
fused.py: gate+up one GEMM, act fused), split-reference (the split modules as written, captured
in a graph: the naive split), and fused split FFNs: low-rank light at several heavy ratios and
budgets, int4 light (heavy kept bf16) and uniform (no split) baselines.

Roofline speedup: weight-bytes ratio (dense / variant) up to 16 tokens, FLOPs ratio at 2048 tokens,
and at 128 tokens the ratio of the floors max(bytes / HBM, FLOPs / peak) (H200 ceilings in
bench/common.py). ``roofline_share`` = measured speedup / roofline speedup.

    python bench/ffn.py                      # all shapes, GPU, writes bench/results/ffn-h200.json
    python bench/ffn.py --shapes smollm2-135m --tokens 1 16 --out /tmp/x.json
    python bench/ffn.py --shapes llama2-7b --tokens 1 16 --recipes lowrank-h0.10-b0.67  # quick
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BF16_FLOPS_PER_S,
    FFN_SHAPES,
    HBM_BYTES_PER_S,
    RESULTS,
    FFNSpec,
    QuantRecipe,
    Recipe,
    dense_mlp,
    ffn_flops,
    graph_time_ms,
    machine,
    module_bytes,
    quant_split_mlp,
    split_mlp,
    write_json,
)
from ffsplit.environ import environ  # noqa: E402
from ffsplit.split.fused import FusedFFNCore, fuse_projections  # noqa: E402

L2_BYTES = 60e6  # H200 L2 (KINDS.md); weights of all copies together exceed it 4x
TOKENS = (1, 16, 128, 2048)
PDL_COMPARE = False  # --pdl-compare
E2E_REDUCTION = 0.67  # FFN reduction that makes a Llama-2-7B 43.1% smaller (bench/e2e.py)


def recipes(spec: FFNSpec) -> list[Recipe]:
    group = 128 if spec.d % 128 == 0 else 64
    return [
        Recipe("lowrank-h0.10-b0.50", 0.10, "lowrank", 0.50),
        Recipe("lowrank-h0.10-b0.67", 0.10, "lowrank", E2E_REDUCTION),
        Recipe("lowrank-h0.20-b0.67", 0.20, "lowrank", E2E_REDUCTION),
        Recipe("lowrank-uniform-b0.67", 0.0, "lowrank", E2E_REDUCTION),
        Recipe("int4-h0.10", 0.10, "quant", group=group),
        Recipe("int4-h0.20", 0.20, "quant", group=group),
        Recipe("int4-uniform", 0.0, "quant", group=group),
    ]


def copies_for(nbytes: int) -> int:
    return max(2, min(48, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


def roofline(
    spec: FFNSpec, recipe: Recipe | None, tokens: int, dense_bytes: int, variant_bytes: int
) -> float:
    flops_dense = ffn_flops(spec, None, tokens)
    flops_variant = ffn_flops(spec, recipe, tokens)
    if tokens <= 16:
        return dense_bytes / variant_bytes
    if tokens >= 2048:
        return flops_dense / flops_variant
    floor_dense = max(dense_bytes / HBM_BYTES_PER_S, flops_dense / BF16_FLOPS_PER_S)
    floor_variant = max(variant_bytes / HBM_BYTES_PER_S, flops_variant / BF16_FLOPS_PER_S)
    return floor_dense / floor_variant


def time_modules(modules: list[torch.nn.Module], x: torch.Tensor) -> float:
    def run() -> None:
        for m in modules:
            m(x)

    with torch.no_grad():
        return graph_time_ms(run, calls_per_replay=len(modules))


def stage_profile(cores: list[FusedFFNCore], tokens: int) -> dict[str, Any]:
    """Time each decode kernel of a fused FFN alone, with the weight bytes it must read."""
    from ffsplit.kernels import ffn

    core = cores[0]
    x = torch.randn(tokens, core.d, device="cuda", dtype=core.w1.dtype)
    hidden = core._first_kernels(x)
    n_heavy = (2 if core.gated else 1) * core.m_heavy

    def nbytes(*tensors: torch.Tensor | None) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    stages = []
    if core.light == "lowrank":
        z = torch.randn(tokens, core.r_gate + core.r_up, device="cuda", dtype=torch.float32)

        def first_only() -> None:
            for c in cores:
                ffn.first(
                    x,
                    c.w1,
                    c.b1[:n_heavy] if c.b1 is not None else None,
                    gated=c.gated,
                    act=c.act_name,
                    m_heavy=c.m_heavy,
                    light="lowrank",
                    hidden_cols=c.hidden_features,
                    r_first=c.r_gate + c.r_up,
                    zero_offset=c.m_heavy,
                    zero_cols=c.r_down,
                )

        def chain_only() -> None:
            for c in cores:
                ffn.lowrank_chain(
                    z,
                    hidden[:, c.m_heavy :],
                    c.a_gate,
                    c.a_up,
                    c.b_down_t,
                    gated=c.gated,
                    act=c.act_name,
                    bias_gate=c.bias_gate,
                    bias_up=c.bias_up,
                )

        stages += [
            ("first", first_only, nbytes(core.w1)),
            ("chain", chain_only, nbytes(core.a_gate, core.a_up, core.b_down_t)),
        ]
    else:

        def first_stage() -> None:
            for c in cores:
                c._first_kernels(x)

        q = [getattr(core, n, None) for n in ("q1", "q1_scales", "q1_zeros")]
        stages.append(("first", first_stage, nbytes(core.w1, *q)))

    def last_stage() -> None:
        for c in cores:
            c._last_kernels(hidden)

    q = [getattr(core, n, None) for n in ("q3", "q3_scales", "q3_zeros")]
    stages.append(("last", last_stage, nbytes(core.w3, *q)))
    return time_stages(
        stages, len(cores), lambda name: f"  stage {core.light:7s} tokens {tokens:2d} {name:5s}"
    )


def time_stages(
    stages: list[tuple[str, Any, int]], copies: int, heading: Any
) -> dict[str, dict[str, float]]:
    """Each (name, function over the copies, weight bytes it reads) timed alone in a CUDA graph:
    ms per copy, bytes and TB/s, printed after ``heading(name)``."""
    out = {}
    with torch.no_grad():
        for name, fn, weights in stages:
            ms = graph_time_ms(fn, calls_per_replay=copies)
            out[name] = {"ms": ms, "weight_bytes": weights, "tb_per_s": weights / ms / 1e9}
            print(
                f"{heading(name)} {1e3 * ms:7.2f} us "
                f"{weights / 1e6:6.1f} MB {weights / ms / 1e9:5.2f} TB/s",
                flush=True,
            )
    return out


@dataclass(frozen=True)
class DenseBaseline:
    """The dense FFN of one shape, timed once: every variant's row is against it (style.md, 10)."""

    spec: FFNSpec
    tokens: tuple[int, ...]
    inputs: dict[int, torch.Tensor]  # one input per token count, shared by every variant
    ms: dict[int, float]
    nbytes: int
    copies: int


def dense_baseline(
    spec: FFNSpec, tokens: tuple[int, ...], dtype: torch.dtype, label: str
) -> tuple[DenseBaseline, list[torch.nn.Module]]:
    """The inputs, then the stock dense MLP's copies timed at every token count (printed under
    ``label``); returns the baseline and the copies (the caller frees them)."""
    device = torch.device("cuda")
    inputs = {t: torch.randn(t, spec.d, device=device, dtype=dtype) for t in tokens}
    dense_one = dense_mlp(spec, device, dtype)
    dense_bytes = module_bytes(dense_one)
    k = copies_for(dense_bytes)
    dense = [dense_one] + [dense_mlp(spec, device, dtype) for _ in range(k - 1)]
    dense_ms = {t: time_modules(dense, inputs[t]) for t in tokens}
    for t in tokens:
        print(
            f"{spec.name:13s} {t:5d} {label}{dense_ms[t]:8.4f} ms "
            f"({dense_bytes / dense_ms[t] / 1e9:.2f} TB/s)",
            flush=True,
        )
    return DenseBaseline(spec, tokens, inputs, dense_ms, dense_bytes, k), dense


def _fuse(mlp: torch.nn.Module, dtype: torch.dtype) -> Any:
    """The fused execution form of an MLP's projections (what load_variant runs on CUDA)."""
    return fuse_projections(mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, dtype=dtype)


def bench_shape(
    spec: FFNSpec, tokens: tuple[int, ...], dtype: torch.dtype, only: list[str] | None = None
) -> tuple[list, dict]:
    base, dense = dense_baseline(spec, tokens, dtype, "dense        ")
    rows: list[dict[str, Any]] = [
        _row(base, t, "dense", None, base.ms[t], base.nbytes, base.nbytes, base.copies)
        for t in tokens
    ]
    profiles: dict[str, Any] = {}
    fused_dense = [_fuse(m, dtype) for m in dense]
    del dense
    _free()
    _measure(rows, base, "dense-fused", None, fused_dense, base.nbytes)
    del fused_dense
    _free()
    for recipe in recipes(spec):
        if only is None or recipe.name in only:
            _bench_recipe(rows, profiles, base, recipe, dtype)
    return rows, profiles


def _bench_recipe(
    rows: list, profiles: dict, base: DenseBaseline, recipe: Recipe, dtype: torch.dtype
) -> None:
    """One recipe's split FFN: the naive split (for the e2e recipe), then its fused form, and
    the fused form's decode stages alone for the profiled recipes."""
    spec, device = base.spec, torch.device("cuda")
    one = split_mlp(spec, recipe, device, dtype)
    split_bytes = module_bytes(one)
    k = copies_for(split_bytes)
    mlps = [one] + [split_mlp(spec, recipe, device, dtype) for _ in range(k - 1)]
    if recipe.name == "lowrank-h0.10-b0.67":
        _measure(rows, base, "split-reference-" + recipe.name, recipe, mlps, split_bytes)
    cores = [_fuse(m, dtype) for m in mlps]
    del mlps, one
    _free()
    _measure(rows, base, recipe.name, recipe, cores, split_bytes)
    if recipe.name in ("lowrank-h0.10-b0.67", "int4-h0.10", "lowrank-uniform-b0.67"):
        profiles.setdefault(spec.name, {})[recipe.name] = {
            f"tokens_{t}": stage_profile(cores, t) for t in base.tokens if t <= 16
        }
    del cores
    _free()


def _measure(
    rows: list,
    base: DenseBaseline,
    variant: str,
    recipe: Recipe | None,
    modules: list,
    split_bytes: int,
) -> None:
    stored = sum(module_bytes(m) for m in modules) // len(modules)
    # the fused kernels again with programmatic dependent launch (--pdl-compare): same tiles
    settings: list[tuple[str, dict[str, str]]] = [("", {})]
    if PDL_COMPARE and not variant.startswith("split-reference"):
        settings.append(("+pdl", {"FFSPLIT_KERNEL_PDL": "1"}))
    for suffix, variables in settings:
        with environ(**variables):
            for t in base.tokens:
                ms = time_modules(modules, base.inputs[t])
                row = _row(base, t, variant + suffix, recipe, ms, split_bytes, stored, len(modules))
                row["pdl"] = os.environ.get("FFSPLIT_KERNEL_PDL", "0") == "1"
                rows.append(row)
                print(
                    f"{base.spec.name:13s} {t:5d} {variant + suffix:34s} {ms:8.4f} ms  "
                    f"x{row['speedup']:.2f} (roofline x{row['roofline_speedup']:.2f}, "
                    f"{100 * row['roofline_share']:.0f}%)",
                    flush=True,
                )


def _row(
    base: DenseBaseline,
    tokens: int,
    variant: str,
    recipe: Recipe | None,
    split_ms: float,
    split_bytes: int,
    stored_bytes: int,
    copies: int,
) -> dict[str, Any]:
    spec, dense_ms, dense_bytes = base.spec, base.ms[tokens], base.nbytes
    rl = roofline(spec, recipe, tokens, dense_bytes, split_bytes)
    return {
        "shape": spec.name,
        "d": spec.d,
        "m": spec.m,
        "tokens": tokens,
        "variant": variant,
        "recipe": recipe.describe(spec) if recipe is not None else None,
        **speed_columns(dense_ms, split_ms, rl, dense_bytes, split_bytes, stored_bytes, "split"),
        "copies": copies,
    }


def speed_columns(
    dense_ms: float,
    ms: float,
    roof: float,
    dense_bytes: int,
    nbytes: int,
    stored: int,
    name: str,
) -> dict[str, Any]:
    """The timing and byte columns of every row (``name``: what the variant's are called)."""
    return {
        "dense_ms": dense_ms,
        "split_ms": ms,
        "speedup": dense_ms / ms,
        "roofline_speedup": roof,
        "roofline_share": dense_ms / ms / roof,
        "dense_bytes": dense_bytes,
        f"{name}_bytes": nbytes,
        "stored_bytes": stored,
        "ffn_reduction": 1 - nbytes / dense_bytes,
        f"{name}_tb_per_s": nbytes / ms / 1e9,
        "dense_tb_per_s": dense_bytes / dense_ms / 1e9,
    }


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _speed_up_autotuning() -> None:
    """Shorter autotuning runs (Triton's defaults time each tile for ~125 ms)."""
    import triton
    import triton.testing

    from ffsplit.kernels import ffn

    def quick(fn: Any, quantiles: Any) -> Any:
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    for name in ("first", "chain", "last"):
        for mode in ("one", "tile"):
            ffn._kernel(name, mode).do_bench = quick


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tile the autotuner kept per kernel, token mode and weight-shape key (for the notes)."""
    from ffsplit.kernels import ffn

    out: dict[str, dict[str, str]] = {}
    for (name, mode), kernel in ffn._kernels.items():
        cache = getattr(kernel, "cache", {})
        out[f"{name}/{mode}"] = {str(key[:4]): str(config) for key, config in cache.items()}
    return out


# ------------------------------------------------------------------------- quant variants (issue 13)

QUANT_RECIPES = {
    r.name: r
    for r in (
        QuantRecipe("int4-h0.05", 0.05, 16, 4),
        QuantRecipe("int4-h0.10", 0.10, 16, 4),
        QuantRecipe("int8-h0.05", 0.05, 16, 8),
        QuantRecipe("int8-h0.10", 0.10, 16, 8),
        QuantRecipe("mix-h0.10-b0.70", 0.10, 16, None, reduction=0.70),  # int4/int3 (solver)
        QuantRecipe("mix-h0.10-b0.50", 0.10, 16, None, reduction=0.50),  # int8/int4 (solver)
        QuantRecipe("int4-h0.10-heavy8", 0.10, 8, 4),
        # the default recipe's layer allocation (six widths in one FFN, no bf16): the shares it
        # gave SmolLM2 at a 75% smaller FFN (manifests of the low-bit sweep, docs/results-lowbit.md)
        QuantRecipe(
            "layer-b0.75",
            0.0,
            16,
            None,
            shares=((8, 0.001), (6, 0.003), (5, 0.016), (4, 0.457), (3, 0.52), (2, 0.003)),
        ),  # fmt: skip
        QuantRecipe("int4-uniform", 0.0, 16, 4),
        QuantRecipe("int8-uniform", 0.0, 16, 8),
    )
}
# (library, recipe): the libraries run the same recipes (one light width) two GEMMs per matrix
QUANT_BASELINES = (
    ("gemlite", "int4-uniform"),
    ("gemlite", "int4-h0.10"),
    ("gemlite", "int8-uniform"),
    ("gemlite", "int8-h0.10"),
    ("tinygemm", "int4-uniform"),
    ("tinygemm", "int4-h0.10"),
)
QUANT_PROFILED = ("int4-h0.10", "int8-h0.10", "int4-uniform")


def _kernel_name(tokens: int, core: object) -> str:
    return (
        "ffsplit-qffn"
        if core.use_kernels(tokens, torch.device("cuda"))
        else ("ffsplit-prefill (triton dequant + cublas)")
    )


def quant_row(
    spec: FFNSpec,
    tokens: int,
    variant: str,
    recipe: QuantRecipe,
    kernel: str,
    dense_ms: float,
    ms: float,
    dense_bytes: int,
    variant_bytes: int,
    stored: int,
) -> dict[str, Any]:
    """One row of quant-h200.json (the schema issue 13 asks for, plus bytes and TB/s)."""
    roof = dense_bytes / variant_bytes if tokens <= 16 else 1.0  # dense FLOPs at 2048 tokens
    if 16 < tokens < 2048:
        flops = ffn_flops(spec, None, tokens)
        floor_dense = max(dense_bytes / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S)
        floor_variant = max(variant_bytes / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S)
        roof = floor_dense / floor_variant
    counts = recipe.light_counts(spec)
    return {
        "shape": spec.name,
        "tokens": tokens,
        "variant": variant,
        "light_bits": {str(b): n for b, n in counts.items()},
        "heavy_ratio": recipe.heavy_ratio,
        "heavy_bits": recipe.heavy_bits,
        "group": recipe.group,
        "kernel": kernel,
        **speed_columns(dense_ms, ms, roof, dense_bytes, variant_bytes, stored, "variant"),
    }


def quant_stage_profile(cores: list, tokens: int) -> dict[str, Any]:
    """Each decode stage alone (CUDA graph over the copies): weight bytes it streams and TB/s."""
    core = cores[0]
    x = torch.randn(tokens, core.d, device="cuda", dtype=core.dtype)
    hidden = core._first_kernels(x)
    first_bytes = sum(
        t.numel() * t.element_size()
        for name, t in [*core.named_parameters(), *core.named_buffers()]
        if name in ("w_dense", "bias_first") or "_first" in name
    )
    last_bytes = core.nbytes() - first_bytes
    stages = [
        ("first", lambda: [c._first_kernels(x) for c in cores], first_bytes),
        ("last", lambda: [c._last_kernels(hidden) for c in cores], last_bytes),
    ]
    return time_stages(stages, len(cores), lambda name: f"  stage {name:5s} tokens {tokens:2d}")


@torch.no_grad()
def _quant_errors(core: object, tokens: tuple[int, ...]) -> dict[int, float]:
    """The fused core (the tiles it tuned) against float32 dequantise-then-matmul, per token count:
    every timed configuration is also checked."""
    out = {}
    for t in tokens:
        x = torch.randn(t, core.d, device="cuda", dtype=core.dtype)
        want = core._last_reference(core._first_reference(x.float()))
        got = core(x).float()
        out[t] = ((got - want).norm() / want.norm()).item()
    return out


def bench_quant_shape(
    spec: FFNSpec,
    tokens: tuple[int, ...],
    names: list[str],
    which: str,
    rows: list[dict[str, Any]],
    profiles: dict[str, Any],
    save: Any,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Rows for one shape, appended to ``rows`` and saved after every variant (a crash keeps
    what was measured). which: "ours", "libraries" or "all"."""
    base, dense = dense_baseline(spec, tokens, dtype, "dense (cublas)  ")
    del dense
    _free()
    for name in names if which != "libraries" else []:
        _quant_ours(rows, profiles, base, name, dtype)
        save()
    if which != "ours":
        for kernel, name in QUANT_BASELINES:
            if name in names and _quant_library(rows, base, kernel, name, dtype):
                save()


def _quant_ours(
    rows: list, profiles: dict, base: DenseBaseline, name: str, dtype: torch.dtype
) -> None:
    """One quant recipe through ffsplit's fused kernels: rows with the tuned core's error
    against the float32 reference, and the decode stages alone for the profiled recipes."""
    spec, device = base.spec, torch.device("cuda")
    recipe = QUANT_RECIPES[name]
    nbytes = recipe.nbytes(spec)
    k = copies_for(nbytes)
    cores = []
    for _ in range(k):
        mlp = quant_split_mlp(spec, recipe, device, dtype)
        cores.append(_fuse(mlp, dtype))
        del mlp
    stored = cores[0].nbytes()
    first_core = cores[0]
    errors = _quant_errors(first_core, tuple(t for t in base.tokens if t <= 16))
    kernel_of = functools.partial(_kernel_name, core=first_core)
    _record_quant(rows, base, name, recipe, kernel_of, cores, nbytes, stored)
    for row in rows:
        if row.get("variant") == name and row.get("shape") == spec.name:
            row["relative_error_vs_reference"] = errors.get(row["tokens"])
    if name in QUANT_PROFILED:
        profiles.setdefault(spec.name, {})[name] = {
            f"tokens_{t}": quant_stage_profile(cores, t) for t in base.tokens if t <= 16
        }
    del cores
    _free()


def _quant_library(
    rows: list, base: DenseBaseline, kernel: str, name: str, dtype: torch.dtype
) -> bool:
    """One recipe through a library (GemLite, tinygemm); False where it could not be built
    (the reason is a row)."""
    from bench.quant_baselines import baseline_bytes, baseline_mlp

    spec, device = base.spec, torch.device("cuda")
    recipe = QUANT_RECIPES[name]
    try:
        k = copies_for(recipe.nbytes(spec))
        mlps = [baseline_mlp(kernel, spec, recipe, device, dtype) for _ in range(k)]
    except Exception as exc:  # noqa: BLE001 - library missing or shape refused: noted
        print(f"{spec.name} {kernel} {name}: cannot build: {exc}", flush=True)
        rows.append(
            {
                "shape": spec.name,
                "variant": f"{name} [{kernel}]",
                "kernel": kernel,
                "error": str(exc)[:300],
            }
        )
        return False
    label = kernel if recipe.heavy_ratio == 0 else f"cublas heavy + {kernel} light"
    _record_quant(
        rows,
        base,
        f"{name} [{kernel}]",
        recipe,
        lambda t, label=label: label,
        mlps,
        recipe.nbytes(spec),
        baseline_bytes(mlps[0]),
    )
    del mlps
    _free()
    return True


def _record_quant(
    rows: list,
    base: DenseBaseline,
    variant: str,
    recipe: QuantRecipe,
    kernel_of: Any,
    modules: list,
    nbytes: int,
    stored: int,
) -> None:
    """Time the modules at every token count: a row each (an error row where one fails)."""
    spec = base.spec
    for t in base.tokens:
        try:
            ms = time_modules(modules, base.inputs[t])
        except Exception as exc:  # noqa: BLE001 - a library that cannot run a shape: noted
            print(f"{spec.name} {t} {variant}: failed: {exc}", flush=True)
            rows.append(
                {
                    "shape": spec.name,
                    "tokens": t,
                    "variant": variant,
                    "kernel": kernel_of(t),
                    "error": str(exc)[:300],
                }
            )
            continue
        row = quant_row(
            spec, t, variant, recipe, kernel_of(t), base.ms[t], ms, base.nbytes, nbytes, stored
        )
        rows.append(row)
        print(
            f"{spec.name:13s} {t:5d} {variant:34s} {ms:8.4f} ms x{row['speedup']:.2f} "
            f"(roofline x{row['roofline_speedup']:.2f}, {100 * row['roofline_share']:.0f}%) "
            f"[{row['kernel']}]",
            flush=True,
        )


def _header() -> dict[str, Any]:
    """What both FFN benchmarks' JSON starts with: the machine, dtype, timing and ceilings."""
    return {
        "machine": machine(),
        "dtype": "bfloat16",
        "timing": "CUDA graph replays, median of 7 trials; weights of all copies > 4x L2",
        "ceilings": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "bf16_flops_per_s": BF16_FLOPS_PER_S},
    }


def main_quant(args: argparse.Namespace) -> None:
    """bench/results/quant-h200.json: the quant variants, GemLite and tinygemm, dense cuBLAS."""
    from ffsplit.kernels import qffn

    if not torch.cuda.is_available():
        raise SystemExit("bench/ffn.py --quant times CUDA graphs: it needs a GPU")
    torch.manual_seed(0)
    names = args.recipes or list(QUANT_RECIPES)
    all_rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    out = args.out if args.out != RESULTS / "ffn-h200.json" else RESULTS / "quant-h200.json"

    def save() -> None:
        write_json(
            out,
            {
                "benchmark": "ffn-quant",
                "command": " ".join(["python3", *sys.argv]),
                **_header(),
                "roofline": "stored-bytes ratio at <=16 tokens (dense / variant), FLOPs ratio (1.0) "
                "at 2048, ratio of floors at 128",
                "tiles": {f"{k[0]}/{k[1]}": str(v) for k, v in qffn.TILES.items()},
                "tuning": qffn.tuning_log,
                "rows": all_rows,
                "decode_stage_profile": profiles,
            },
        )

    for shape in args.shapes:
        spec = FFN_SHAPES[shape]
        bench_quant_shape(spec, tuple(args.tokens), names, args.which, all_rows, profiles, save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(FFN_SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--out", type=Path, default=RESULTS / "ffn-h200.json")
    parser.add_argument("--recipes", nargs="*", default=None, help="only these recipe names")
    parser.add_argument(
        "--pdl-compare",
        action="store_true",
        help="also time every fused variant with programmatic dependent launch (+pdl rows)",
    )
    parser.add_argument("--quant", action="store_true", help="quant variants -> quant-h200.json")
    parser.add_argument(
        "--quant-report",
        action="store_true",
        help="merge bench/results/quant-calls/ into quant-h200.json and its chart (no GPU)",
    )
    parser.add_argument(
        "--which",
        default="all",
        choices=["all", "ours", "libraries"],
        help="--quant: ffsplit's kernels, the libraries (GemLite, tinygemm), or both",
    )
    args = parser.parse_args()
    if args.quant_report:
        quant_report()
        return
    if args.quant:
        main_quant(args)
        return
    global PDL_COMPARE
    PDL_COMPARE = args.pdl_compare
    if not torch.cuda.is_available():
        raise SystemExit("bench/ffn.py times CUDA graphs: it needs a GPU")
    _speed_up_autotuning()
    torch.manual_seed(0)
    all_rows, profiles = [], {}
    for name in args.shapes:  # results written after every shape: a cut-short run keeps them
        rows, prof = bench_shape(FFN_SHAPES[name], tuple(args.tokens), torch.bfloat16, args.recipes)
        all_rows += rows
        profiles.update(prof)
        write_json(
            args.out,
            {
                "benchmark": "ffn",
                **_header(),
                "roofline": "bytes ratio at <=16 tokens, FLOPs ratio at 2048, ratio of floors at 128",
                "rows": all_rows,
                "decode_stage_profile": profiles,
                "tuned_tiles": tuned_tiles(),
            },
        )
    for kernel, tiles in tuned_tiles().items():
        for key, config in tiles.items():
            print(f"tuned {kernel} {key}: {config}", flush=True)


# ----------------------------------------------------------------------- quant report (issue 13)

QUANT_CALLS = RESULTS / "quant-calls"  # what each device call wrote, kept as it came back


def quant_report(out: Path = RESULTS / "quant-h200.json") -> None:
    """bench/results/quant-h200.json (+ .png) from the calls' own JSON: the latest tiles' rows
    (call 3), call 2's rows of the recipes call 3 did not re-run and of the libraries, and the
    end-to-end run. Every section keeps its command and machine."""

    def load(name: str) -> dict[str, Any]:
        return json.loads((QUANT_CALLS / name).read_text())

    final, earlier, libs = (
        load("call3/quant-h200.json"),
        load("call2/quant-h200.json"),
        load("call2/quant-lib-h200.json"),
    )
    e2e, e2e_earlier = load("call3/e2e-quant-h200.json"), load("call2/e2e-quant-h200.json")
    have = {(r["shape"], r["variant"]) for r in final["rows"]}
    rows = [{**r, "run": "call 3"} for r in final["rows"]]
    rows += [
        {**r, "run": "call 2 (earlier tiles)"}
        for r in earlier["rows"]
        if (r["shape"], r["variant"]) not in have
    ]
    rows += [{**r, "run": "call 2"} for r in libs["rows"]]
    e2e_rows = {}
    for model, result in e2e["models"].items():
        for label in ("int4-light", "int8-light"):
            entry = result.get(label)
            if entry:
                e2e_rows[f"{model} {label}"] = {
                    "recipe": entry["recipe"],
                    "size_reduction": entry["size_reduction"],
                    "ffn_reduction": entry["ffn_reduction"],
                    "prefill_speedup": entry["prefill_speedup"],
                    "decode_speedup_b1": entry["decode_speedup_b1"],
                    "decode_speedup_b16": entry["decode_speedup_b16"],
                    "dense_ms": result["dense"],
                    "compressed_ms": entry["compressed"],
                }
    payload = {
        "benchmark": "ffn-quant (issue 13)",
        "commands": {
            "rows (call 3)": final["command"],
            "rows (call 2)": earlier["command"],
            "libraries (call 2)": libs["command"],
            "e2e (call 3)": e2e["machine"]["command"],
        },
        "machine": final["machine"],
        "timing": final["timing"],
        "roofline": final["roofline"],
        "ceilings": final["ceilings"],
        "tuning": final["tuning"],
        "rows": rows,
        "decode_stage_profile": final["decode_stage_profile"],
        "e2e": e2e_rows,
        "e2e_loop": e2e["loop"],
        "e2e_earlier_tiles": {
            m: {k: v for k, v in r.items() if k in ("int4-light", "int8-light")}
            for m, r in e2e_earlier["models"].items()
        },
    }
    write_json(out, payload)
    plot_quant(payload, out.with_suffix(".png"))


def plot_quant(payload: dict[str, Any], out: Path) -> None:
    """Speedup over dense cuBLAS per variant and kernel, at 1, 16 and 2048 tokens (Llama-2-7B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "speedup" in r and r["shape"] == "llama2-7b"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(6 * len(tokens), 5.5), sharey=True)
    for ax, t in zip(axes, tokens, strict=True):
        values = []
        for v in variants:
            match = [r for r in rows if r["variant"] == v and r["tokens"] == t]
            values.append(match[0]["speedup"] if match else 0.0)
        roof = [
            next((r["roofline_speedup"] for r in rows if r["variant"] == v and r["tokens"] == t), 0)
            for v in variants
        ]
        ys = range(len(variants))
        ax.barh(list(ys), values, color=["C1" if "[" in v else "C0" for v in variants])
        ax.scatter(roof, list(ys), marker="|", color="k", s=120, label="bytes/FLOPs roofline")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"Llama-2-7B FFN, {t} token{'s' if t > 1 else ''}")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(variants, fontsize=8)
        ax.set_xlabel("speedup over dense bf16 (cuBLAS), CUDA graph")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Quantized light parts on one H200: ffsplit's kernels (blue) vs GemLite/tinygemm")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
