"""Evaluate a base model or a variant: quality, size, and latency raced against the dense base."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffsplit.adapters import get_adapter
from ffsplit.config import (
    DEFAULT_CORPUS,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_WINDOW,
)
from ffsplit.errors import FFSplitError
from ffsplit.jobs.common import (
    Progress,
    _stage,
    load_any,
)
from ffsplit.split import ffn_modules


def size_of(model: nn.Module) -> dict[str, Any]:
    from ffsplit.eval import model_size

    return model_size(model, ffn_modules(model, get_adapter(model))).to_dict()


def evaluate_job(
    model_or_dir: str | Path,
    *,
    text: str | Path | None = None,
    corpus: str = DEFAULT_CORPUS,
    max_tokens: int = DEFAULT_EVAL_TOKENS,
    window: int = DEFAULT_WINDOW,
    latency: bool = False,
    latency_workload: dict[str, int] | None = None,
    probe_limit: int = 1500,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quality (perplexity, or probe accuracy for encoders), size, and optionally latency.

    Perplexity uses the evaluation split of a packaged corpus (disjoint from calibration), or the
    whole of a local text file. Latency races the variant against its base model in one run, on
    the model already loaded for quality; latency_workload overrides latency_against_base's
    prompt_tokens / decode_tokens / repeats.
    """
    from ffsplit.models.loading import is_causal_lm

    net, tokenizer, info = load_any(model_or_dir, device=device)
    if tokenizer is None:
        raise FFSplitError(f"{model_or_dir}: no tokenizer files; cannot evaluate on text")
    result: dict[str, Any] = {"model": str(model_or_dir), "kind": info["kind"]}
    if info["kind"] == "variant":
        manifest = info["manifest"]
        result["base_model"] = manifest["base_model"]
        result["recipe"] = manifest["recipe"]
        result["ffn_reduction"] = manifest["sizes"]["ffn_reduction"]
    else:
        result["base_model"] = info["base_model"]
        result["ffn_reduction"] = 0.0
    result["size"] = size_of(net)
    if is_causal_lm(net.config):
        from ffsplit.data.windows import corpus_windows
        from ffsplit.eval import perplexity

        source = text if text is not None else corpus
        split = "all" if text is not None else "evaluation"
        windows, ref = corpus_windows(tokenizer, source, split, max_tokens, window)
        ppl = perplexity(net, windows, progress=_stage(progress, "perplexity"))
        result["perplexity"] = ppl.perplexity
        result["eval"] = {**ref.to_dict(), **ppl.to_dict()}
        if not math.isfinite(ppl.perplexity):
            raise FFSplitError(f"{model_or_dir}: perplexity is not finite")
    else:
        from ffsplit.data.corpora import labelled_texts
        from ffsplit.eval import probe_accuracy

        train = labelled_texts("tweets", "calibration", limit=probe_limit)
        test = labelled_texts("tweets", "evaluation", limit=probe_limit)
        probe = probe_accuracy(net, tokenizer, train[0], train[1], test[0], test[1])
        result["accuracy"] = probe.accuracy
        result["eval"] = {
            "corpus": "tweets",
            "train": len(train[0]),
            "test": len(test[0]),
            **probe.to_dict(),
        }
        if info["kind"] == "variant":
            result.update(
                hidden_error_against_base(
                    net, tokenizer, result["base_model"], corpus, max_tokens, window, device
                )
            )
    if latency:
        result["latency"] = latency_against_base(
            net, result["base_model"], info["kind"], device, **(latency_workload or {})
        )
        if info["kind"] == "variant" and torch.device(device).type == "cuda":
            del net  # the GPU race loads both models again in the serving dtype
            result["gpu_speed"] = gpu_speed_against_base(model_or_dir, result["base_model"])
    return result


def hidden_error_against_base(
    net: nn.Module,
    tokenizer: Any,
    base_model: dict[str, Any],
    corpus: str,
    max_tokens: int,
    window: int,
    device: str,
) -> dict[str, Any]:
    """An encoder variant's relative error of the last hidden states against its dense base on
    the corpus's evaluation split: ||H - H_dense|| / ||H_dense||. The probe refits on the
    variant's features and hides much of the damage (its 95% interval is about +-2.5 points on
    1,500 tweets); this is the sensitive measure that tells low-bit methods apart."""
    from ffsplit.analysis import hidden_state_error
    from ffsplit.data.windows import evaluation_windows

    windows, ref = evaluation_windows(tokenizer, corpus, max_tokens, window)
    base = _base_of(base_model, device)
    error = hidden_state_error(base, windows)
    del base
    return {
        "hidden_error": error(net),
        "hidden_eval": {
            **ref.to_dict(),
            "metric": f"relative error of the last hidden states vs dense ({corpus} evaluation)",
        },
    }


def gpu_speed_against_base(variant_dir: str | Path, base_model: dict[str, Any]) -> dict[str, Any]:
    """The variant's speed on this process's GPU against its dense base, both in bf16 through the
    same CUDA-graph decode loop (the variant's split FFNs fused: ffsplit.split.fused, the quant
    and low-rank kernels): decode at batch 1 and 16, prefill of 2048 tokens, interleaved repeats
    with 95% intervals (ffsplit.eval.gpu_speed). Small models are launch-bound: their ratios sit
    near 1 whatever the FFN does (the record says which GPU and loop)."""
    from ffsplit.eval.gpu_speed import measure_gpu_speed
    from ffsplit.variant import load_variant

    variant, _, _ = load_variant(variant_dir, dtype=torch.bfloat16, device="cuda")
    base = _base_of(base_model, "cuda").to(torch.bfloat16)
    speed = measure_gpu_speed(variant, base)
    return {**speed.to_dict(), "metrics": speed.metrics()}


def _base_of(base_model: dict[str, Any], device: str) -> nn.Module:
    """The dense base model a variant was made from, its weights' hash checked."""
    from ffsplit.models.loading import load_model

    base, _, ref = load_model(base_model.get("path") or base_model["name"], device=device)
    expected = base_model.get("weights_sha256")
    if expected and ref.weights_sha256 != expected:
        raise FFSplitError(
            f"{ref.path}: base model weights (sha256 {ref.weights_sha256[:12]}...) are not "
            f"the ones this variant was made from ({str(expected)[:12]}...)"
        )
    return base


def latency_against_base(
    net: nn.Module,
    base_model: dict[str, Any],
    kind: str,
    device: str = "cpu",
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 5,
) -> dict[str, Any]:
    """Prefill and decode latency of the dense base and this model, interleaved in one run."""
    from ffsplit.eval import measure_latency, speedup_intervals, speedups
    from ffsplit.models.loading import is_causal_lm

    models = (
        {"dense": net}
        if kind == "base"
        else {"dense": _base_of(base_model, device), "variant": net}
    )
    decode = decode_tokens if is_causal_lm(net.config) else 0
    results = measure_latency(models, prompt_tokens, decode, repeats=repeats)
    out: dict[str, Any] = {name: r.to_dict() for name, r in results.items()}
    if "variant" in results:
        out["speedup"] = speedups(results, reference="dense")["variant"]
        intervals = speedup_intervals(results, reference="dense")["variant"]
        out["speedup_interval"] = {key: value.to_dict() for key, value in intervals.items()}
    out["workload"] = {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode,
        "repeats": repeats,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    return out
