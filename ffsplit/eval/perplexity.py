"""Perplexity of a causal LM on fixed token windows (the quality measure for causal LMs).

Each window is scored on its own (no carried context), labels are the inputs shifted by one, so the
first token of a window has no loss and n windows of T tokens score n * (T - 1) tokens. The loss is
computed here from the logits (float32 log-softmax, chunked over positions so that a 262k vocabulary
does not need a second full-size copy) and summed in float64, so the number does not depend on the
batch size beyond float rounding and is identical run to run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ffsplit.errors import FFSplitError

# Upper bound on float32 logit elements upcast at once (64 Mi elements = 256 MiB).
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over scored tokens; tokens_per_s counts scored tokens per wall-clock second."""

    perplexity: float
    nll_mean: float
    tokens: int
    windows: int
    seconds: float
    tokens_per_s: float

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.windows <= 0:
            raise FFSplitError(
                f"PerplexityResult needs tokens > 0 and windows > 0, got {self.tokens}, {self.windows}"
            )
        if not math.isfinite(self.nll_mean):
            raise FFSplitError(f"PerplexityResult: mean NLL is not finite ({self.nll_mean})")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return int(size) if size is not None else None


def sequence_nll(
    logits: torch.Tensor, tokens: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS
) -> torch.Tensor:
    """Per-sequence summed NLL (float64) of tokens[:, 1:] given logits[:, :-1] ([B, T, V], [B, T]).

    Upcasts about chunk_elements logits (at least one position) to float32 at a time.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise FFSplitError(
            f"sequence_nll: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}"
        )
    batch, length, vocab = logits.shape
    targets = tokens[:, 1:].to(logits.device)
    step = max(1, chunk_elements // max(1, batch * vocab))
    total = torch.zeros(batch, dtype=torch.float64, device=logits.device)
    for start in range(0, length - 1, step):
        stop = min(length - 1, start + step)
        chunk = logits[:, start:stop].float()
        log_norm = torch.logsumexp(chunk, dim=-1)
        picked = chunk.gather(-1, targets[:, start:stop, None]).squeeze(-1)
        total += (log_norm - picked).double().sum(dim=1)
    return total


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Score token windows [n, T] with a causal LM that returns logits; report exp(mean NLL).

    The model is put in eval mode for the run (and restored); progress(done, total) is called after
    each batch with counts of windows.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise FFSplitError("perplexity: windows must be a 2-D LongTensor [n, T] of token ids")
    if windows.dtype not in (torch.int64, torch.int32):
        raise FFSplitError(f"perplexity: windows must hold integer token ids, got {windows.dtype}")
    count, length = windows.shape
    if count < 1 or length < 2:
        raise FFSplitError(
            f"perplexity: need at least 1 window of at least 2 tokens, got shape {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise FFSplitError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    vocab = _vocab_size(model)
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise FFSplitError(
            f"perplexity: token ids span [{low}, {high}] but the model's vocabulary has {vocab} "
            "entries; tokenize with the model's own tokenizer"
        )

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    start_time = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                output = model(input_ids=batch, use_cache=False)
                logits = output.logits if hasattr(output, "logits") else output[0]
                if logits.shape[:2] != batch.shape:
                    raise FFSplitError(
                        f"perplexity: model returned logits {tuple(logits.shape)} for input "
                        f"{tuple(batch.shape)}; it must be a causal LM returning per-position logits"
                    )
                total_nll += sequence_nll(logits, batch).sum().cpu()
                del output, logits
                if progress is not None:
                    progress(min(start + batch_size, count), count)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start_time

    tokens = count * (length - 1)
    nll_mean = float(total_nll) / tokens
    return PerplexityResult(
        perplexity=math.exp(nll_mean) if nll_mean < 700 else float("inf"),
        nll_mean=nll_mean,
        tokens=tokens,
        windows=count,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else float("inf"),
    )
