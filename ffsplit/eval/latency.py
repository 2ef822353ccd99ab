"""Wall-clock latency of whole models (prefill, decode) and of single FFN modules, CPU or GPU.

Models compared are measured in ONE run, interleaved repeat by repeat so that clock, thermal and
cache drift hit all of them alike; the order alternates (A B, then B A, ...) so neither always runs
first. Timing uses time.perf_counter with torch.cuda.synchronize around each timed region on a GPU.
Inputs are random token ids (or random activations) from a seeded generator: speed does not depend
on values (method.md), and every model sees the same inputs.

Prefill is one forward pass over [batch, prompt_tokens] without a KV cache, keeping logits of the
last position only when the model takes ``logits_to_keep`` (as generate() does). Decode is a greedy
loop of single-token steps on the KV cache after an untimed prefill; only the steps are timed.
Eager PyTorch is measured as is (no graph capture for whole models); ffn_layer_latency can capture
each module in a CUDA graph, which is where split FFNs can win (method.md, engineering facts).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ffsplit.errors import FFSplitError
from ffsplit.eval.perplexity import model_device


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one model; decode fields are None when decode_tokens == 0."""

    name: str
    device: str
    batch_size: int
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    prefill_ms_median: float
    prefill_ms_p90: float
    prefill_tokens_per_s: float
    decode_ms_per_token_median: float | None
    decode_ms_per_token_p90: float | None
    decode_tokens_per_s: float | None
    prefill_ms: tuple[float, ...]
    decode_ms_per_token: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefill_ms"] = list(self.prefill_ms)
        out["decode_ms_per_token"] = list(self.decode_ms_per_token)
        return out


@dataclass(frozen=True)
class LayerLatency:
    """Per-call latency of two FFN modules at one token count; speedup = a / b (> 1: b is faster)."""

    tokens: int
    a_ms_median: float
    a_ms_p90: float
    b_ms_median: float
    b_ms_p90: float
    speedup: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_p90(samples: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(samples, dtype=np.float64)
    return float(np.median(values)), float(np.percentile(values, 90))


def _vocab_size(model: nn.Module, name: str) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
        size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        raise FFSplitError(f"measure_latency: cannot tell the vocabulary size of model '{name}'")
    return int(size)


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters


def _output_cache(output: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    return None


class _Runner:
    """Calls one model for prefill and decode with the arguments it supports."""

    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name = name
        self.model = model
        self.device = device
        self.last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self.cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"

    def prefill(self, ids: torch.Tensor) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.model(input_ids=ids, use_cache=False, **self.last_only)
        _sync(self.device)
        return (time.perf_counter() - start) * 1000.0

    def decode(self, ids: torch.Tensor, steps: int) -> float:
        """Milliseconds per step of a greedy decode of `steps` tokens after an untimed prefill."""
        output = self.model(input_ids=ids, use_cache=True, **self.last_only)
        cache = _output_cache(output)
        if cache is None:
            raise FFSplitError(
                f"measure_latency: model '{self.name}' returned no KV cache; decode timing needs a "
                "causal LM (or pass decode_tokens=0)"
            )
        token = output.logits[:, -1:].argmax(dim=-1)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            output = self.model(input_ids=token, use_cache=True, **{self.cache_argument: cache})
            cache = _output_cache(output)
            token = output.logits[:, -1:].argmax(dim=-1)
        _sync(self.device)
        return (time.perf_counter() - start) * 1000.0 / steps


def _common_device(
    models: Mapping[str, nn.Module], device: str | torch.device | None
) -> torch.device:
    """The one device all models run on (moved there when `device` is given)."""
    if device is not None:
        target = torch.device(device)
        for model in models.values():
            model.to(target)
    devices = {name: model_device(model) for name, model in models.items()}
    if len(set(devices.values())) != 1:
        raise FFSplitError(
            f"measure_latency: models sit on different devices {devices}; pass device=... to move them"
        )
    return next(iter(devices.values()))


def measure_latency(
    models: Mapping[str, nn.Module],
    prompt_tokens: int,
    decode_tokens: int,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, LatencyResult]:
    """Time prefill and greedy decode of every model on the same seeded token ids, interleaved.

    device None keeps each model where it is (all must share one device); a device moves the
    models there in place. decode_tokens=0 times prefill only (encoders).
    """
    if not models:
        raise FFSplitError("measure_latency: no models given")
    if prompt_tokens < 1 or decode_tokens < 0 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise FFSplitError(
            "measure_latency: need prompt_tokens >= 1, decode_tokens >= 0, batch_size >= 1, "
            f"repeats >= 1, warmup >= 0; got {prompt_tokens}, {decode_tokens}, {batch_size}, "
            f"{repeats}, {warmup}"
        )
    run_device = _common_device(models, device)
    vocab = min(_vocab_size(model, name) for name, model in models.items())
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(run_device)

    runners = [_Runner(name, model, run_device) for name, model in models.items()]
    modes = {name: model.training for name, model in models.items()}
    prefill: dict[str, list[float]] = {runner.name: [] for runner in runners}
    decode: dict[str, list[float]] = {runner.name: [] for runner in runners}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for round_index in range(warmup + repeats):
                order = runners if round_index % 2 == 0 else runners[::-1]
                for runner in order:
                    prefill_ms = runner.prefill(ids)
                    decode_ms = runner.decode(ids, decode_tokens) if decode_tokens else None
                    if round_index >= warmup:
                        prefill[runner.name].append(prefill_ms)
                        if decode_ms is not None:
                            decode[runner.name].append(decode_ms)
    finally:
        for name, model in models.items():
            model.train(modes[name])

    results: dict[str, LatencyResult] = {}
    for runner in runners:
        prefill_median, prefill_p90 = _median_p90(prefill[runner.name])
        decode_median = decode_p90 = decode_rate = None
        if decode_tokens:
            decode_median, decode_p90 = _median_p90(decode[runner.name])
            decode_rate = batch_size * 1000.0 / decode_median
        results[runner.name] = LatencyResult(
            name=runner.name,
            device=str(run_device),
            batch_size=batch_size,
            prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens,
            repeats=repeats,
            prefill_ms_median=prefill_median,
            prefill_ms_p90=prefill_p90,
            prefill_tokens_per_s=batch_size * prompt_tokens * 1000.0 / prefill_median,
            decode_ms_per_token_median=decode_median,
            decode_ms_per_token_p90=decode_p90,
            decode_tokens_per_s=decode_rate,
            prefill_ms=tuple(prefill[runner.name]),
            decode_ms_per_token=tuple(decode[runner.name]),
        )
    return results


@dataclass(frozen=True)
class Speedup:
    """How much faster a model ran than the reference, with the noise of the measurement.

    Rounds are interleaved, so round i of both models saw the same machine state: the speedup of
    round i is reference_i / model_i, and `low`..`high` is a distribution-free interval for the
    median of those paired ratios (order statistics of the binomial sign test), at `confidence`
    (the coverage the repeats allow: with 5 rounds the interval is [min, max], 93.75%). A busy
    machine widens it; two models whose intervals overlap did not differ beyond the noise.
    """

    median: float
    low: float
    high: float
    confidence: float
    rounds: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# The interval aimed at; fewer rounds give less (reported as `confidence`).
SPEEDUP_CONFIDENCE = 0.95


def _median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, coverage): the widest symmetric order-statistic interval whose coverage of the
    median reaches SPEEDUP_CONFIDENCE, or [min, max] when the rounds cannot reach it."""
    from math import comb

    x = sorted(values)
    n = len(x)
    best = (x[0], x[-1], 1.0 - 2.0 * 0.5**n)
    for k in range(1, n // 2 + 1):  # drop k-1 from each end: interval [x_(k), x_(n-k+1)]
        tail = sum(comb(n, i) for i in range(k)) / 2.0**n
        coverage = 1.0 - 2.0 * tail
        if coverage < SPEEDUP_CONFIDENCE:
            break
        best = (x[k - 1], x[n - k], coverage)
    return best


def paired_speedup(reference: Sequence[float], model: Sequence[float]) -> Speedup:
    """Speedup of `model` over `reference` from paired, interleaved timings (see Speedup)."""
    if len(reference) != len(model) or not reference:
        raise FFSplitError(
            f"paired_speedup: need the same number (>= 1) of rounds, got {len(reference)} and "
            f"{len(model)}"
        )
    ratios = [r / m for r, m in zip(reference, model, strict=True)]
    low, high, coverage = _median_interval(ratios)
    return Speedup(float(np.median(ratios)), low, high, coverage, len(ratios))


def speedups(
    results: Mapping[str, LatencyResult], reference: str = "dense"
) -> dict[str, dict[str, float]]:
    """Median-latency speedup of every model over the reference (> 1: faster than the reference)."""
    if reference not in results:
        raise FFSplitError(
            f"speedups: reference '{reference}' is not among the results {sorted(results)}"
        )
    base = results[reference]
    out: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        entry = {"prefill": base.prefill_ms_median / result.prefill_ms_median}
        if base.decode_ms_per_token_median and result.decode_ms_per_token_median:
            entry["decode"] = base.decode_ms_per_token_median / result.decode_ms_per_token_median
        out[name] = entry
    return out


def speedup_intervals(
    results: Mapping[str, LatencyResult], reference: str = "dense"
) -> dict[str, dict[str, Speedup]]:
    """The paired-round Speedup (median and interval) of every model over the reference, for
    prefill and, where both decoded, decode."""
    if reference not in results:
        raise FFSplitError(
            f"speedup_intervals: reference '{reference}' is not among the results {sorted(results)}"
        )
    base = results[reference]
    out: dict[str, dict[str, Speedup]] = {}
    for name, result in results.items():
        entry = {"prefill": paired_speedup(base.prefill_ms, result.prefill_ms)}
        if base.decode_ms_per_token and result.decode_ms_per_token:
            entry["decode"] = paired_speedup(base.decode_ms_per_token, result.decode_ms_per_token)
        out[name] = entry
    return out


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _timed_call(module: nn.Module, x: torch.Tensor, cuda_graph: bool) -> Callable[[], object]:
    """A no-argument callable running module(x): eager, or replaying a captured CUDA graph."""
    if not cuda_graph:
        return lambda: module(x)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up allocations before capture (PyTorch CUDA graph docs)
            module(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x)
    return graph.replay


def ffn_layer_latency(
    module_a: nn.Module,
    module_b: nn.Module,
    d: int,
    tokens_list: Sequence[int] = (1, 16, 128),
    repeats: int = 20,
    warmup: int = 3,
    calls_per_sample: int = 10,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
    seed: int = 0,
) -> list[LayerLatency]:
    """Per-call latency of two FFN modules (a: reference, b: variant) on x [1, tokens, d].

    Samples alternate a/b; each sample times calls_per_sample back-to-back calls (timer resolution
    and launch jitter matter at one token). dtype defaults to module_a's float dtype; device None
    keeps the modules where they are, otherwise they are moved in place. cuda_graph captures each
    module in a CUDA graph per token count (GPU only).
    """
    if d < 1 or not tokens_list or min(tokens_list) < 1:
        raise FFSplitError(
            f"ffn_layer_latency: need d >= 1 and token counts >= 1, got d={d}, {tuple(tokens_list)}"
        )
    if repeats < 1 or warmup < 0 or calls_per_sample < 1:
        raise FFSplitError(
            "ffn_layer_latency: need repeats >= 1, warmup >= 0, calls_per_sample >= 1; got "
            f"{repeats}, {warmup}, {calls_per_sample}"
        )
    if device is not None:
        module_a.to(torch.device(device))
        module_b.to(torch.device(device))
    run_device = model_device(module_a)
    if model_device(module_b) != run_device:
        raise FFSplitError(
            "ffn_layer_latency: the two modules sit on different devices; pass device=..."
        )
    if cuda_graph and run_device.type != "cuda":
        raise FFSplitError("ffn_layer_latency: cuda_graph=True needs the modules on a CUDA device")
    run_dtype = dtype or _module_dtype(module_a)
    generator = torch.Generator().manual_seed(seed)

    results: list[LayerLatency] = []
    modes = (module_a.training, module_b.training)
    module_a.eval()
    module_b.eval()
    try:
        with torch.inference_mode():
            for tokens in tokens_list:
                x = torch.randn(1, tokens, d, generator=generator).to(run_device, run_dtype)
                calls = [_timed_call(module_a, x, cuda_graph), _timed_call(module_b, x, cuda_graph)]
                samples: list[list[float]] = [[], []]
                for round_index in range(warmup + repeats):
                    order = (0, 1) if round_index % 2 == 0 else (1, 0)
                    for which in order:
                        call = calls[which]
                        _sync(run_device)
                        start = time.perf_counter()
                        for _ in range(calls_per_sample):
                            call()
                        _sync(run_device)
                        elapsed = (time.perf_counter() - start) * 1000.0 / calls_per_sample
                        if round_index >= warmup:
                            samples[which].append(elapsed)
                a_median, a_p90 = _median_p90(samples[0])
                b_median, b_p90 = _median_p90(samples[1])
                results.append(
                    LayerLatency(
                        tokens=int(tokens),
                        a_ms_median=a_median,
                        a_ms_p90=a_p90,
                        b_ms_median=b_median,
                        b_ms_p90=b_p90,
                        speedup=a_median / b_median,
                    )
                )
    finally:
        module_a.train(modes[0])
        module_b.train(modes[1])
    return results
