"""GPU speed of a variant against its dense base: same decode loop, interleaved repeats, intervals.

What the pipeline's evaluate task calls when it has a GPU (issue 13, item 4): both models on one
device, each decode step (forward, greedy argmax, position update) captured in one CUDA graph over
HF's static KV cache (optionally the forward torch.compile'd first, the same for both), prefill
eager. Timing blocks of the two models alternate (A B B A ...) so that clock and thermal drift
hit both alike; every repeat gives one ratio ``base_ms / variant_ms``, and the speedup is their
median with a distribution-free interval (the CPU race's statistics, ffsplit.eval.latency). Two speedups whose intervals overlap are a
tie (``SpeedRatio.ties``); a variant is faster only when its interval lies above 1.

Small models are launch-bound (a few MB of FFN weights per layer: the ~40 kernels of the rest of
each layer dominate), so expect ratios near 1 for them whatever the FFN does; 7B-class models
are bound by bytes. On CPU the loop runs eagerly (for tests; not a GPU number).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ffsplit.errors import FFSplitError


@dataclass(frozen=True)
class SpeedRatio:
    """base / variant time: the median of the paired ratios and its interval (95% with >= 9
    repeats; ffsplit.eval.latency.Speedup says the coverage fewer give)."""

    ratio: float
    low: float
    high: float
    repeats: int
    base_ms: float
    variant_ms: float

    def ties(self, other: SpeedRatio) -> bool:
        """Whether the two intervals overlap: the difference is inside the noise."""
        return self.low <= other.high and other.low <= self.high

    @property
    def faster(self) -> bool:
        """Faster than the base outside the noise."""
        return self.low > 1.0


def ratio_interval(base_ms: list[float], variant_ms: list[float]) -> SpeedRatio:
    """Pairwise ratios of interleaved timings -> their median and its distribution-free
    interval (ffsplit.eval.latency.paired_speedup: the same statistics as the CPU race)."""
    from ffsplit.eval.latency import paired_speedup

    speed = paired_speedup(base_ms, variant_ms)
    return SpeedRatio(
        ratio=speed.median,
        low=speed.low,
        high=speed.high,
        repeats=speed.rounds,
        base_ms=statistics.median(base_ms),
        variant_ms=statistics.median(variant_ms),
    )


@dataclass(frozen=True)
class GPUSpeed:
    """Decode (batch 1 and 16) and prefill speedups of a variant over its base."""

    decode_b1: SpeedRatio | None
    decode_b16: SpeedRatio | None
    prefill: SpeedRatio | None
    device: str
    loop: str

    def metrics(self) -> dict[str, float]:
        """Flat metrics for logging: gpu_decode_speedup_b1 (+ _low/_high), ... ."""
        out: dict[str, float] = {}
        for name, value in (
            ("gpu_decode_speedup_b1", self.decode_b1),
            ("gpu_decode_speedup_b16", self.decode_b16),
            ("gpu_prefill_speedup", self.prefill),
        ):
            if value is not None:
                out[name] = value.ratio
                out[f"{name}_low"] = value.low
                out[f"{name}_high"] = value.high
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"past_key_values": cache} if "past_key_values" in params else {"cache": cache}


class _DecodeLoop:
    """One model's decode step at one batch size, ready to time in blocks of ``steps`` steps."""

    def __init__(
        self, model: nn.Module, batch: int, prompt: int, steps: int, compiled: bool, seed: int
    ) -> None:
        from transformers import StaticCache

        self.device = next(model.parameters()).device
        self.graph_ok = self.device.type == "cuda"
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(self.device)
        self.prompt, self.steps = prompt, steps
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
        kw = _cache_kwargs(model, cache)
        forward = (
            torch.compile(model.forward, dynamic=False, mode="max-autotune-no-cudagraphs")
            if compiled
            else model.forward
        )
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
        self.tok = out.logits[:, -1:].argmax(-1)
        self.pos = torch.full((batch, 1), prompt, device=self.device, dtype=torch.long)

        def step() -> None:
            logits = forward(
                input_ids=self.tok,
                position_ids=self.pos,
                use_cache=True,
                logits_to_keep=1,
                **kw,
            ).logits
            self.tok.copy_(logits[:, -1:].argmax(-1))
            self.pos.add_(1)

        self.step = step
        self.cache = cache
        self.graph = None
        with torch.no_grad():
            if self.graph_ok:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    step()
            else:
                step()

    def block_ms(self) -> float:
        """ms per step over one block of ``steps`` steps (graph replays write the KV slot fixed
        at capture; eager steps start from an emptied cache)."""
        self.pos.fill_(self.prompt)
        with torch.no_grad():
            if self.graph is not None:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                for _ in range(self.steps):
                    self.graph.replay()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / self.steps
            self.cache.reset()  # eager steps advance the cache's fill: start each block empty
            t0 = time.perf_counter()
            for _ in range(self.steps):
                self.step()
            return (time.perf_counter() - t0) * 1e3 / self.steps


def _prefill_timer(model: nn.Module, tokens: int, seed: int) -> Callable[[], float]:
    """One forward over ``tokens`` tokens (an encoder's whole forward: no cache, no logits)."""
    from ffsplit.models.loading import is_causal_lm

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    kw = {"use_cache": False, "logits_to_keep": 1} if is_causal_lm(model.config) else {}

    def once() -> float:
        with torch.no_grad():
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                model(input_ids=ids, **kw)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)
            t0 = time.perf_counter()
            model(input_ids=ids, **kw)
            return (time.perf_counter() - t0) * 1e3

    once()  # warm-up (kernels compiled and tuned, prefill buffers allocated)
    return once


def interleaved(
    base: Callable[[], float], variant: Callable[[], float], repeats: int
) -> SpeedRatio:
    """Time the two alternately (A B, then B A, ...), one ratio per repeat."""
    base_ms, variant_ms = [], []
    for r in range(repeats):
        if r % 2 == 0:
            base_ms.append(base())
            variant_ms.append(variant())
        else:
            variant_ms.append(variant())
            base_ms.append(base())
    return ratio_interval(base_ms, variant_ms)


def measure_gpu_speed(
    variant: nn.Module,
    base: nn.Module,
    *,
    batches: tuple[int, ...] = (1, 16),
    prefill_tokens: int | None = 2048,
    prompt: int = 32,
    steps: int = 64,
    repeats: int = 10,
    compiled: bool = False,
    seed: int = 0,
) -> GPUSpeed:
    """Speedups of ``variant`` over ``base`` (both loaded on the same CUDA device, e.g. by
    ffsplit.variant.io.load_variant(..., dtype=torch.bfloat16, device="cuda"), which fuses the
    split FFNs, and the base model in bf16). Decode batches 1 and 16 (or those asked), prefill of
    ``prefill_tokens`` (None: skipped); ``repeats`` interleaved blocks each (see module doc).
    An encoder (MiniLM, MPNet) has no decode: its forward over ``prefill_tokens`` tokens, at most
    its position table's length, is timed as the prefill."""
    from ffsplit.models.loading import is_causal_lm

    if repeats < 2:
        raise FFSplitError("measure_gpu_speed: repeats must be >= 2 for an interval")
    dev_v = next(variant.parameters()).device
    if next(base.parameters()).device != dev_v:
        raise FFSplitError("measure_gpu_speed: base and variant must be on the same device")
    if not is_causal_lm(variant.config):
        batches = ()
        positions = getattr(variant.config, "max_position_embeddings", None) or 512
        # MPNet's and RoBERTa's tables start after the padding index
        positions -= (getattr(variant.config, "pad_token_id", None) or 0) + 1
        prefill_tokens = min(prefill_tokens or 512, positions)
    decode: dict[int, SpeedRatio] = {}
    for batch in batches:
        loops = [_DecodeLoop(m, batch, prompt, steps, compiled, seed) for m in (base, variant)]
        for loop in loops:
            loop.block_ms()  # warm-up block
        decode[batch] = interleaved(loops[0].block_ms, loops[1].block_ms, repeats)
        del loops
    prefill = None
    if prefill_tokens:
        prefill = interleaved(
            _prefill_timer(base, prefill_tokens, seed),
            _prefill_timer(variant, prefill_tokens, seed),
            repeats,
        )
    name = torch.cuda.get_device_name(dev_v) if dev_v.type == "cuda" else "cpu (eager, not a GPU)"
    loop = ("torch.compile + " if compiled else "") + (
        "CUDA graph per decode step" if dev_v.type == "cuda" else "eager steps"
    )
    if not batches:
        loop = f"encoder forward of {prefill_tokens} tokens (no decode)"
    return GPUSpeed(decode.get(1), decode.get(16), prefill, name, loop)
