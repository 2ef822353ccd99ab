"""End-to-end speed: dense bf16 models against FFSplit-compressed ones, 43.1% smaller (the paper's size).

Workload pinned here (style.md, 10). GPU: HF models built from the public 7B configs (Llama-2-7B,
Llama-3-8B, Mistral-7B, OPT-6.7B) and SmolLM2-135M's config, random bf16 weights (valid for speed);
prefill latency of 2048 tokens (batch 1, last-token logits as generate() computes them) and decode
of 256 new tokens at batch 1 and 16 after a 32-token prompt. Dense and compressed run through the
same decode loop: HF static KV cache, the whole step (forward, greedy argmax, position update)
captured in one CUDA graph and replayed 256 times. The compressed model is split by FFSplit's
structure, then converted by ``fuse_model`` (what load_variant uses on GPU).

Recipe (random-weight models): in every FFN the first ceil(0.10 m) neurons are heavy (bf16, kept
dense); the light neurons are factored to the rank the budget solver (compress/budget.py) gives for
the FFN reduction that makes the whole model 43.1% smaller, rounded down to a multiple of 16;
factor values random. Where the time goes: the decode step is also timed with the FFNs removed
(zero modules), which splits it into FFN and non-FFN time.

CPU (this machine): the real SmolLM2-135M, fp32, the same structure with a seeded random heavy
set and plain truncated-SVD factors of its real light weights, decode through generate()
(eager, dynamic cache) for both models.

    python bench/e2e.py                               # GPU: all models -> bench/results/e2e-h200.json
    python bench/e2e.py --models smollm2-135m --real  # CPU: real SmolLM2 -> e2e-cpu-smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ALIGN,
    RESULTS,
    capture_graph,
    cpu_time_ms,
    event_time_ms,
    machine,
    module_bytes,
    replay_ms,
    write_json,
)
from ffsplit.adapters.registry import get_adapter  # noqa: E402
from ffsplit.compress.budget import FFNShape, solve_rank  # noqa: E402
from ffsplit.environ import environ  # noqa: E402
from ffsplit.split.modules import SplitInProjection, SplitOutProjection  # noqa: E402
from ffsplit.split.parts import DenseLinear, LowRankLinear  # noqa: E402

SIZE_REDUCTION = 0.431  # whole-model size reduction reported by the paper (arXiv 2401.04044)
HEAVY_RATIO = 0.10
PROMPT = 32
NEW_TOKENS = 256
PREFILL = 2048
BATCHES = (1, 16)
BATCHES_COMPILED: tuple[str, ...] = ("b1", "b16")  # --compiled-batches
# --compile-mode: inductor autotunes its GEMM/GEMV templates (Llama-2-7B b1 on the H200: dense
# 4.96 -> 4.34 ms, compressed 3.70 -> 3.19, no FFN 2.36 -> 1.87); the CUDA graph stays ours.
COMPILE_MODE = "max-autotune-no-cudagraphs"
PDL_COMPARE = False  # --pdl-compare
TRACE = False  # --trace


# The public checkpoints' shapes (their config.json): hidden, FFN neurons, layers, attention heads,
# key/value heads (OPT: none, multi-head), vocabulary, positions.
_SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 4096),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 8192),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000, 32768),
    "opt-6.7b": (4096, 16384, 32, 32, None, 50272, 2048),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, 8192),
}


def _config(name: str) -> Any:
    import transformers as tf

    d, m, layers, heads, kv_heads, vocab, positions = _SHAPES[name]
    shape = {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads}
    shape.update(vocab_size=vocab, max_position_embeddings=positions)
    if name == "opt-6.7b":
        config = tf.OPTConfig(ffn_dim=m, word_embed_proj_dim=d, do_layer_norm_before=True, **shape)
    else:
        kind = tf.MistralConfig if name == "mistral-7b" else tf.LlamaConfig
        extra = {"sliding_window": None} if name == "mistral-7b" else {}
        tied = name == "smollm2-135m"
        shape.update(intermediate_size=m, num_key_value_heads=kv_heads, **extra)
        config = kind(rms_norm_eps=1e-5, tie_word_embeddings=tied, **shape)
    config.architectures = [type(config).__name__.removesuffix("Config") + "ForCausalLM"]
    return config


def build_random(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            _config(name), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- compression


def ffn_bytes(model: nn.Module, adapter: Any) -> int:
    return sum(
        module_bytes(model.get_submodule(p))
        for h in adapter.ffns(model)
        for p in h.projection_paths
    )


def plan(model: nn.Module, adapter: Any) -> dict[str, Any]:
    """The FFN reduction and light rank that make the whole model SIZE_REDUCTION smaller."""
    handle = adapter.ffns(model)[0]
    w = adapter.weights(model, handle)
    shape = FFNShape.from_weights(w)
    total = module_bytes(model)
    ffn = ffn_bytes(model, adapter)
    target = SIZE_REDUCTION * total / ffn
    heavy = math.ceil(HEAVY_RATIO * shape.m)
    rank = solve_rank(shape, heavy, target) // ALIGN * ALIGN
    return {
        "dense_bytes": total,
        "dense_ffn_bytes": ffn,
        "target_ffn_reduction": target,
        "heavy_ratio": HEAVY_RATIO,
        "heavy": heavy,
        "neurons": shape.m,
        "rank": rank,
    }


def _factor(
    weight: torch.Tensor, rank: int, real: bool, bias: torch.Tensor | None = None
) -> LowRankLinear:
    if real:
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        a, b = u[:, :rank] * s[:rank], vh[:rank]
    else:
        rows, cols = weight.shape
        a = torch.randn(rows, rank, device=weight.device) * rank**-0.5
        b = torch.randn(rank, cols, device=weight.device) * cols**-0.5
    return LowRankLinear(a.to(weight.dtype), b.to(weight.dtype), bias)


def _out_projection(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hi: torch.Tensor,
    lo: torch.Tensor,
    rank: int,
    real: bool,
) -> SplitOutProjection:
    light = _factor(weight[lo], rank, real, None if bias is None else bias[lo])
    heavy = DenseLinear(weight[hi], None if bias is None else bias[hi])
    return SplitOutProjection([heavy, light])


@torch.no_grad()
def compress(
    model: nn.Module, adapter: Any, recipe: dict[str, Any], real: bool, seed: int = 0
) -> None:
    """Split every FFN in place: heavy neurons dense, light neurons factored to the recipe's rank.

    real=False: the first `heavy` neurons are heavy, factors random (speed only).
    real=True: a seeded random heavy set, plain truncated SVD of the real light weights.
    """
    gen = torch.Generator().manual_seed(seed)
    heavy, rank = recipe["heavy"], recipe["rank"]
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        m = w.up.shape[0]
        order = (torch.randperm(m, generator=gen) if real else torch.arange(m)).to(w.up.device)
        hi, lo = order[:heavy], order[heavy:]
        up = _out_projection(w.up, w.up_bias, hi, lo, rank, real)
        gate = _out_projection(w.gate, w.gate_bias, hi, lo, rank, real) if w.gated else None
        down = SplitInProjection(
            [DenseLinear(w.down[:, hi]), _factor(w.down[:, lo], rank, real)], w.down_bias
        )
        adapter.replace(model, handle, up=up, gate=gate, down=down)
        del w


# ------------------------------------------------------------------------------------ timing


def _forward_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The cache keyword of this transformers version (5.17: past_key_values; later: cache)."""
    params = inspect.signature(model.forward).parameters
    return {"past_key_values": cache} if "past_key_values" in params else {"cache": cache}


@torch.no_grad()
def prefill_ms(model: nn.Module, vocab: int, device: torch.device) -> float:
    ids = torch.randint(0, vocab, (1, PREFILL), device=device)

    def run() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    if device.type == "cuda":
        return event_time_ms(run, warmup=2, trials=5)
    return cpu_time_ms(run, warmup=1, trials=2)


@torch.no_grad()
def decode_gpu(
    model: nn.Module,
    batch: int,
    vocab: int,
    needs_mask: bool,
    compiled: bool = False,
    trace: bool = False,
) -> dict[str, Any]:
    """ms per decode step: the whole step in one CUDA graph, replayed NEW_TOKENS times.

    compiled: the forward goes through torch.compile (inductor fuses the small ops of
    attention, norms and rotary; the fused FFN is one opaque custom op) before the capture.
    """
    from transformers import StaticCache

    device = torch.device("cuda")
    max_len = PROMPT + NEW_TOKENS + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    kw = _forward_kwargs(model, cache)
    ids = torch.randint(0, vocab, (batch, PROMPT), device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    tok = out.logits[:, -1:].argmax(-1)
    pos = torch.full((batch, 1), PROMPT, device=device, dtype=torch.long)
    mask = (
        {"attention_mask": torch.ones(batch, max_len, device=device, dtype=torch.long)}
        if needs_mask
        else {}
    )

    forward = (
        torch.compile(model.forward, dynamic=False, mode=COMPILE_MODE)
        if compiled
        else model.forward
    )

    def step() -> None:
        logits = forward(
            input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **kw, **mask
        ).logits
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    graph, warmup_s = capture_graph(step, warmup=2)
    graph.replay()
    steps = max_len - PROMPT - 2 - 1 - 1  # what fits in the static cache after warm-up
    steps = min(steps, NEW_TOKENS)
    torch.cuda.synchronize()
    ms = replay_ms(graph, steps)
    del graph
    out = {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "steps": steps}
    if compiled:
        out["compile_and_warmup_s"] = warmup_s
    if trace:
        # The traced steps run outside the graph, where the cache position comes from how much
        # of the static cache is filled: after the replays it is nearly full, and 8 more steps
        # would index past its end (a device-side assert). Start again from the prompt, so the
        # traced steps see the attention lengths the timed replays began with.
        cache.reset()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)  # the prompt, as above
        pos.fill_(PROMPT)
        out["kernels"] = kernel_breakdown(step, ms)
    del cache
    return out


def kernel_breakdown(step: Any, graph_ms: float, steps: int = 8) -> dict[str, Any]:
    """Where a decode step's GPU time goes: the same step launched without the graph under
    torch.profiler; kernel time per step by kernel name (top 25) and its sum, against the graph
    replay's step time (the rest is launch gaps and bubbles the graph still has)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            entry = kernels.setdefault(event.name[:120], [0.0, 0])
            entry[0] += event.device_time / 1e3 / steps  # us -> ms per step
            entry[1] += 1
    total = sum(ms for ms, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "kernel_ms_per_step": total,
        "graph_step_ms": graph_ms,
        "gaps_ms_per_step": graph_ms - total,
        "launches_per_step": sum(n for _, n in kernels.values()) / steps,
        "top": [
            {"kernel": name, "ms_per_step": ms, "launches_per_step": n / steps}
            for name, (ms, n) in top
        ],
    }


@torch.no_grad()
def decode_cpu(model: nn.Module, batch: int, vocab: int) -> dict[str, Any]:
    """ms per decode step: (generate NEW_TOKENS - generate 1 token) / (NEW_TOKENS - 1), so the
    prompt's prefill is not counted."""
    ids = torch.randint(0, vocab, (batch, PROMPT))

    def run(tokens: int) -> float:
        return cpu_time_ms(
            lambda: model.generate(
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            ),
            warmup=0,
            trials=1,
        )

    run(2)  # warm-up
    ms = (run(NEW_TOKENS) - run(1)) / (NEW_TOKENS - 1)
    return {
        "ms_per_step": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "steps": NEW_TOKENS,
        "loop": "generate(), eager, dynamic cache",
    }


@dataclass(frozen=True)
class Loop:
    """What every measurement of one model (and of its compressed copies) takes."""

    vocab: int
    needs_mask: bool  # OPT derives positions from a mask otherwise
    device: torch.device

    def measure(
        self,
        model: nn.Module,
        name: str,
        what: tuple[str, ...] = ("prefill", "b1", "b16"),
        compiled: bool = False,
        trace: bool = False,
    ) -> dict[str, Any]:
        """Prefill and decode times of ``model`` (printed as they come), decode errors kept."""
        vocab, device, needs_mask = self.vocab, self.device, self.needs_mask
        out: dict[str, Any] = {}
        if "prefill" in what:
            out["prefill_ms"] = prefill_ms(model, vocab, device)
            print(f"  {name:14s} prefill {PREFILL}: {out['prefill_ms']:.2f} ms", flush=True)
        for batch in BATCHES:
            if f"b{batch}" not in what:
                continue
            try:
                result = (
                    decode_gpu(model, batch, vocab, needs_mask, compiled, trace and batch == 1)
                    if device.type == "cuda"
                    else decode_cpu(model, batch, vocab)
                )
            except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
                result = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            out[f"decode_b{batch}"] = result
            shown = {k: v for k, v in result.items() if k != "kernels"}
            print(f"  {name:14s} decode b{batch}: {shown}", flush=True)
            if "kernels" in result:
                _show_kernels(name, result["kernels"])
        return out


def _show_kernels(name: str, k: dict[str, Any]) -> None:
    print(
        f"  {name:14s} kernels {k['kernel_ms_per_step']:.3f} ms/step in "
        f"{k['launches_per_step']:.0f} launches; graph step {k['graph_step_ms']:.3f} ms",
        flush=True,
    )
    for row in k["top"][:12]:
        print(
            f"      {row['ms_per_step']:.4f} ms x{row['launches_per_step']:.0f} {row['kernel'][:90]}"
        )


class _ZeroFFN(nn.Module):
    """Stands in for an FFN (or its last projection) to time the rest of the step."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.width if self.width is not None else x.shape[-1]
        return x.new_zeros(*x.shape[:-1], width)


def remove_ffns(model: nn.Module, adapter: Any, d: int) -> None:
    """Replace every FFN by zeros (gated containers whole; non-gated projections)."""
    from ffsplit.split.fused import _activation_path, _set_module, dataflow_of

    for handle in adapter.ffns(model):
        if dataflow_of(adapter, handle) == "gated_mlp":
            _set_module(model, handle.path, _ZeroFFN())
        else:
            _set_module(model, handle.up_path, _ZeroFFN(1))
            _set_module(model, _activation_path(adapter, handle), nn.Identity())
            _set_module(model, handle.down_path, _ZeroFFN(d))


# ---------------------------------------------------------------------------------------- main


def ratios(dense: dict[str, Any], comp: dict[str, Any]) -> dict[str, float | None]:
    def r(key: str) -> float | None:
        a, b = dense.get(key), comp.get(key)
        if isinstance(a, dict):
            a, b = a.get("ms_per_step"), (b or {}).get("ms_per_step")
        return a / b if a and b else None

    return {
        "prefill_speedup": r("prefill_ms"),
        "decode_speedup_b1": r("decode_b1"),
        "decode_speedup_b16": r("decode_b16"),
    }


def random_model(name: str) -> tuple[nn.Module, Any, Loop, float]:
    """The dense bf16 model of a public config on the GPU, seeded random weights: the model, its
    adapter, its measurement loop, and when the build started (time.time())."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    started = time.time()
    torch.manual_seed(0)
    dense = build_random(name, device, dtype)
    loop = Loop(dense.config.vocab_size, dense.config.model_type == "opt", device)
    return dense, get_adapter(dense), loop, started


def reductions(
    comp: nn.Module, adapter: Any, dense_bytes: int, dense_ffn_bytes: int
) -> dict[str, float]:
    """How much smaller the compressed model is, whole and in its FFNs, by stored bytes."""
    return {
        "size_reduction": 1 - module_bytes(comp) / dense_bytes,
        "ffn_reduction": 1 - ffn_bytes(comp, adapter) / dense_ffn_bytes,
    }


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def bench_gpu(
    name: str,
    with_reference: bool,
    compiled: bool = False,
    dense_fused: bool = True,
    save: Any = None,
) -> dict[str, Any]:
    """Dense, compressed (split + fuse_model), dense-fused and no-FFN, same loop for all.

    compiled: decode only, through torch.compile for every variant (prefill is measured eagerly
    by the plain run); dense-fused and the naive split are skipped (compile time).
    """
    from ffsplit.split.fused import fuse_model

    if compiled:
        return bench_gpu_compiled(name, save or (lambda result: None))

    dense, adapter, loop, t0 = random_model(name)
    recipe = plan(dense, adapter)
    print(f"{name}: built in {time.time() - t0:.0f}s; recipe {recipe}", flush=True)
    result: dict[str, Any] = {"recipe": recipe}
    result["dense"] = loop.measure(dense, "dense", trace=TRACE)

    comp = copy.deepcopy(dense)
    compress(comp, adapter, recipe, real=False)
    result.update(reductions(comp, adapter, recipe["dense_bytes"], recipe["dense_ffn_bytes"]))
    result["compressed_bytes"] = module_bytes(comp)
    if with_reference:
        result["split_reference"] = loop.measure(comp, "split-ref", ("b1",))
    report = fuse_model(comp, adapter, strict=True)
    result["compressed_stored_bytes"] = module_bytes(comp)
    result["fuse_dataflow"] = report.dataflow
    result["compressed"] = loop.measure(comp, "compressed", trace=TRACE)
    if PDL_COMPARE:
        with environ(FFSPLIT_KERNEL_PDL="1"):
            result["compressed_pdl"] = loop.measure(comp, "comp-pdl", ("b1",))
    del comp
    _free_gpu()

    if dense_fused:
        fuse_model(dense, adapter, strict=True)
        result["dense_fused"] = loop.measure(dense, "dense-fused")
    remove_ffns(dense, adapter, dense.config.hidden_size)
    result["no_ffn"] = loop.measure(dense, "no-ffn", ("prefill", "b1", "b16"))
    del dense
    _free_gpu()
    result.update(ratios(result["dense"], result["compressed"]))
    if dense_fused:
        result["dense_fused_vs_dense"] = ratios(result["dense"], result["dense_fused"])
        result["compressed_vs_dense_fused"] = ratios(result["dense_fused"], result["compressed"])
    result["profile"] = profile(result)
    result["seconds"] = time.time() - t0
    return result


# ------------------------------------------------------------------------ quant variants (issue 13)

# Recipes of the quant method at 7B scale: heavy 10% of the neurons bf16, the light ones at int4 or
# int8 (group 64, the recipe's default): the widths that keep SmolLM2/Gemma3 within 1% (issue 13).
QUANT_E2E = {
    "int4-light": dict(heavy_ratio=0.10, heavy_bits=16, light_bits=4),
    "int8-light": dict(heavy_ratio=0.10, heavy_bits=16, light_bits=8),
}


@torch.no_grad()
def compress_quant(model: nn.Module, adapter: Any, recipe: Any) -> None:
    """Every FFN split by the quant recipe's structure, random codes (valid for speed)."""
    from bench.common import FFNSpec, quant_split_projections
    from ffsplit.split.fused import activation_name

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        act = activation_name(handle.activation) or "silu"
        spec = FFNSpec(
            "model",
            w.up.shape[1],
            w.up.shape[0],
            w.gate is not None,
            act,
            bias=w.up_bias is not None,
        )
        del w
        up, gate, down = quant_split_projections(spec, recipe, device, dtype)
        adapter.replace(model, handle, up=up, gate=gate, down=down)


def bench_gpu_quant(name: str, recipes: list[str], compiled: bool, save: Any) -> dict[str, Any]:
    """Dense and each quant recipe (split + fuse_model: what load_variant runs on CUDA) through
    the same loop: prefill eager, decode b1/b16 in one CUDA graph per step (torch.compile'd
    forward with --compile)."""
    from bench.common import QuantRecipe
    from ffsplit.split.fused import fuse_model

    dense, adapter, loop, t0 = random_model(name)
    dense_bytes = module_bytes(dense)
    dense_ffn = ffn_bytes(dense, adapter)
    what = ("b1", "b16") if compiled else ("prefill", "b1", "b16")
    result: dict[str, Any] = {"loop": "torch.compile + CUDA graph" if compiled else "CUDA graph"}
    result["dense"] = loop.measure(dense, "dense", what, compiled=compiled)
    save(result)
    for label in recipes:
        recipe = QuantRecipe(label, **QUANT_E2E[label])
        comp = copy.deepcopy(dense)
        compress_quant(comp, adapter, recipe)
        entry: dict[str, Any] = {"recipe": {"name": label, **QUANT_E2E[label], "group": 64}}
        entry.update(reductions(comp, adapter, dense_bytes, dense_ffn))
        report = fuse_model(comp, adapter, strict=True)
        entry["fused_plan"] = vars(next(iter(report.fused.values())))
        entry["compressed"] = loop.measure(comp, label, what, compiled=compiled)
        entry.update(ratios(result["dense"], entry["compressed"]))
        result[label] = entry
        del comp
        _free_gpu()
        save(result)
    del dense
    _free_gpu()
    result["seconds"] = time.time() - t0
    return result


def bench_gpu_compiled(name: str, save: Any) -> dict[str, Any]:
    from ffsplit.split.fused import fuse_model

    dense, adapter, loop, t0 = random_model(name)
    recipe = plan(dense, adapter)
    result: dict[str, Any] = {"recipe": recipe, "loop": "torch.compile(forward) + CUDA graph"}
    comp = copy.deepcopy(dense)
    compress(comp, adapter, recipe, real=False)
    result["size_reduction"] = 1 - module_bytes(comp) / recipe["dense_bytes"]
    fuse_model(comp, adapter, strict=True)
    result["dense"], result["compressed"] = {}, {}
    # b1 of both first (the headline), results saved after every measurement
    for batch in BATCHES_COMPILED:
        for key, model in (("dense", dense), ("compressed", comp)):
            measured = loop.measure(model, f"{key}+compile", (batch,), compiled=True, trace=TRACE)
            result[key].update(measured)
            result.update(ratios(result["dense"], result["compressed"]))
            save(result)
        if PDL_COMPARE and batch == "b1":
            with environ(FFSPLIT_KERNEL_PDL="1"):
                result["compressed_pdl"] = loop.measure(
                    comp, "comp-pdl+compile", ("b1",), compiled=True
                )
            save(result)
    del comp
    remove_ffns(dense, adapter, dense.config.hidden_size)
    result["no_ffn"] = loop.measure(dense, "no-ffn+compile", ("b1",), compiled=True)
    del dense
    _free_gpu()
    result.update(ratios(result["dense"], result["compressed"]))
    result["profile"] = profile(result)
    result["seconds"] = time.time() - t0
    from torch._dynamo.utils import counters

    result["dynamo_graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
    return result


def profile(result: dict[str, Any]) -> dict[str, Any]:
    """Where the time goes: step time minus the step without FFNs = FFN time, dense vs compressed;
    and the end-to-end speedup bound if the FFN took no time at all."""
    out = {}
    for key in ("prefill_ms", "decode_b1", "decode_b16"):

        def ms(variant: str, key: str = key) -> float | None:
            value = result.get(variant, {}).get(key)
            return value.get("ms_per_step") if isinstance(value, dict) else value

        rest, dense, comp = ms("no_ffn"), ms("dense"), ms("compressed")
        if None in (rest, dense, comp):
            continue
        out[key] = {
            "non_ffn_ms": rest,
            "dense_ffn_ms": dense - rest,
            "compressed_ffn_ms": comp - rest,
            "ffn_speedup": (dense - rest) / max(comp - rest, 1e-9),
            "ffn_share_of_dense_step": (dense - rest) / dense,
            "bound_if_ffn_free": dense / rest,
        }
    return out


def bench_cpu_real(name: str) -> dict[str, Any]:
    from ffsplit.models import load_model
    from ffsplit.split.fused import fuse_model

    torch.manual_seed(0)
    t0 = time.time()
    dense, _, _ = load_model(name)
    dense.eval().requires_grad_(False)
    adapter = get_adapter(dense)
    loop = Loop(dense.config.vocab_size, False, torch.device("cpu"))
    recipe = plan(dense, adapter)
    result: dict[str, Any] = {
        "recipe": recipe,
        "weights": "real (ffsplit.models.load_model)",
        "dtype": "float32",
    }
    result["dense"] = loop.measure(dense, "dense")
    comp = copy.deepcopy(dense)
    compress(comp, adapter, recipe, real=True)
    result.update(reductions(comp, adapter, recipe["dense_bytes"], recipe["dense_ffn_bytes"]))
    fuse_model(comp, adapter, strict=True)
    result["compressed"] = loop.measure(comp, "compressed")
    result.update(ratios(result["dense"], result["compressed"]))
    result["seconds"] = time.time() - t0
    return result


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=["llama2-7b", "llama3-8b", "mistral-7b", "opt-6.7b", "smollm2-135m"],
    )
    parser.add_argument("--real", action="store_true", help="CPU: the real packaged model")
    parser.add_argument("--no-reference", action="store_true", help="skip the naive split decode")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-dense-fused", action="store_true", help="skip dense-fused")
    parser.add_argument(
        "--compile", action="store_true", help="GPU decode through torch.compile for every variant"
    )
    parser.add_argument(
        "--pdl-compare",
        action="store_true",
        help="also decode (b1) the compressed model with programmatic dependent launch",
    )
    parser.add_argument(
        "--trace", action="store_true", help="kernel time per decode step (b1), by kernel"
    )
    parser.add_argument(
        "--compiled-batches", default="b1,b16", help="--compile: which batches (b1,b16)"
    )
    parser.add_argument(
        "--compile-mode",
        default=COMPILE_MODE,
        choices=["default", "max-autotune-no-cudagraphs"],
        help="--compile: torch.compile mode, the same for every variant (CUDA graphs are ours)",
    )
    parser.add_argument(
        "--quant",
        default="",
        help=f"comma-separated quant recipes ({', '.join(QUANT_E2E)}) instead of low-rank",
    )
    parser.add_argument("--new-tokens", type=int, default=256, help="(smoke tests)")
    parser.add_argument("--prefill", type=int, default=2048, help="(smoke tests)")
    return parser.parse_args()


def _document(results: dict[str, Any], gpu: bool, compiled: bool) -> dict[str, Any]:
    """The JSON this benchmark writes: machine, pinned workload, the loop, results by model."""
    loop = (
        "static KV cache; whole decode step (forward, argmax, position update) in one "
        "CUDA graph, replayed; prefill eager, last-token logits"
        + (f"; forward through torch.compile (mode {COMPILE_MODE})" if compiled else "")
    )
    return {
        "benchmark": "e2e",
        "machine": machine(),
        "workload": {
            "prompt": PROMPT,
            "new_tokens": NEW_TOKENS,
            "prefill_tokens": PREFILL,
            "batches": list(BATCHES),
            "target_size_reduction": SIZE_REDUCTION,
        },
        "loop": loop if gpu else "generate() for decode, one forward for prefill; eager fp32",
        "models": results,
    }


def main() -> None:
    global NEW_TOKENS, PREFILL, PDL_COMPARE, TRACE, BATCHES_COMPILED, COMPILE_MODE
    args = _arguments()
    NEW_TOKENS, PREFILL = args.new_tokens, args.prefill
    PDL_COMPARE, TRACE = args.pdl_compare, args.trace
    BATCHES_COMPILED = tuple(args.compiled_batches.split(","))
    COMPILE_MODE = args.compile_mode
    gpu = torch.cuda.is_available() and not args.real
    results: dict[str, Any] = {}
    out = args.out or RESULTS / ("e2e-h200.json" if gpu else "e2e-cpu-smollm2.json")

    def save(partial: dict[str, Any] | None = None, name: str = "") -> None:
        if partial is not None:
            results[name] = partial
        write_json(out, _document(results, gpu, args.compile))

    for name in args.models:
        if gpu and args.quant:
            results[name] = bench_gpu_quant(
                name,
                args.quant.split(","),
                args.compile,
                lambda partial, name=name: save(partial, name),
            )
        elif gpu:
            results[name] = bench_gpu(
                name,
                not args.no_reference,
                args.compile,
                not args.no_dense_fused,
                lambda partial, name=name: save(partial, name),
            )
        else:
            results[name] = bench_cpu_real(name)
        save()


if __name__ == "__main__":
    main()
