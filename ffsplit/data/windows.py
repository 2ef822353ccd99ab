"""Fixed token windows from a corpus split: the calibration and evaluation inputs, and their record.

Documents are tokenized, joined with the tokenizer's eos (or a blank line) and cut into full,
non-overlapping windows (no padding). Each window is framed the way the tokenizer frames one text
(Gemma and Llama-2 start with <bos>, BERT wraps in [CLS] ... [SEP], SmolLM2 adds nothing), since
some models are badly off without it. Same corpus, split, tokenizer and sizes: same tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ffsplit.data.corpora import SPLIT_SEED, check_split, corpus_id, documents
from ffsplit.errors import FFSplitError, require

DEFAULT_WINDOW = 512
DEFAULT_CALIBRATION_TOKENS = 16_384
DEFAULT_EVALUATION_TOKENS = 32_768
# Documents are tokenized in batches, only as many as the token budget needs.
_TOKENIZE_BATCH = 8


@dataclass(frozen=True)
class CorpusRef:
    """Which text a number used: corpus, split, window geometry, seed and a hash of the token ids."""

    corpus: str
    split: str
    tokens: int
    window: int
    seed: int
    sha256: str

    def __post_init__(self) -> None:
        for name, kind in (("corpus", str), ("split", str), ("sha256", str)):
            require(isinstance(getattr(self, name), kind), f"CorpusRef.{name} must be a string")
        for name in ("tokens", "window", "seed"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool),
                f"CorpusRef.{name} must be an integer, got {value!r}",
            )
        check_split(self.split)
        require(self.window > 0, f"CorpusRef.window must be positive, got {self.window}")
        require(
            self.tokens > 0 and self.tokens % self.window == 0,
            f"CorpusRef.tokens must be a positive multiple of window={self.window}, "
            f"got {self.tokens}",
        )
        require(
            len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256),
            f"CorpusRef.sha256 must be 64 lowercase hex digits, got {self.sha256!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for manifests and MLflow params."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusRef:
        """Inverse of to_dict; unknown or missing keys are errors."""
        require(isinstance(data, dict), f"CorpusRef: expected a mapping, got {type(data).__name__}")
        fields = set(cls.__dataclass_fields__)
        unknown = set(data) - fields
        missing = fields - set(data)
        require(not unknown, f"CorpusRef: unknown keys {', '.join(sorted(map(repr, unknown)))}")
        require(not missing, f"CorpusRef: missing keys {sorted(missing)}")
        return cls(**data)


def token_ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of a token-id tensor (shape and int64 values), independent of device and dtype."""
    digest = hashlib.sha256(str(list(ids.shape)).encode())
    digest.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Special ids the tokenizer puts before and after one text, e.g. ([bos], []) or ([cls], [sep])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return list(framed[:start]), list(framed[start + len(plain) :])
    return [], []


def separator_ids(tokenizer: Any) -> list[int]:
    """Ids placed between documents: the eos token, else a tokenized blank line."""
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def _token_stream(
    tokenizer: Any, texts: Iterable[str], separator: list[int], needed: int
) -> list[int]:
    """Token ids of the joined documents, stopping once `needed` ids are there."""
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if stream:
                stream.extend(separator)
            stream.extend(ids)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            flush()
            if len(stream) >= needed:
                return stream
    if batch:
        flush()
    return stream


def token_windows(
    tokenizer: Any,
    texts: Sequence[str],
    window: int,
    max_tokens: int,
    special_tokens: bool = True,
    source: str = "the given texts",
) -> torch.Tensor:
    """LongTensor [max_tokens // window, window] of full, non-overlapping windows.

    special_tokens: frame each window like the tokenizer frames one text (see the module doc);
    the framing ids count towards the window. Raises FFSplitError when the texts are too short.
    """
    require(window >= 2, f"token_windows: window must be at least 2, got {window}")
    require(
        max_tokens >= window,
        f"token_windows: max_tokens={max_tokens} is smaller than one window ({window})",
    )
    prefix, suffix = _framing(tokenizer) if special_tokens else ([], [])
    body = window - len(prefix) - len(suffix)
    require(body >= 1, f"token_windows: window={window} leaves no room inside the special tokens")
    count = max_tokens // window
    stream = _token_stream(tokenizer, texts, separator_ids(tokenizer), count * body)
    if len(stream) < count * body:
        found = len(stream) // body
        raise FFSplitError(
            f"{source} gives only {len(stream)} tokens ({found} full windows of {window}); "
            f"asked for {count * window} tokens ({count} windows): lower the token budget or "
            "use a larger corpus"
        )
    body_ids = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    parts = [
        torch.tensor(prefix, dtype=torch.long).expand(count, len(prefix)),
        body_ids,
        torch.tensor(suffix, dtype=torch.long).expand(count, len(suffix)),
    ]
    return torch.cat(parts, dim=1).contiguous()


def corpus_windows(
    tokenizer: Any,
    corpus: str | Path,
    split: str,
    tokens: int,
    window: int = DEFAULT_WINDOW,
    seed: int = SPLIT_SEED,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, CorpusRef]:
    """(windows [tokens // window, window], CorpusRef) of one corpus split."""
    texts = documents(corpus, split, seed=seed, cache_dir=cache_dir)
    name = corpus_id(corpus)
    ids = token_windows(tokenizer, texts, window, tokens, source=f"corpus {name!r} ({split} split)")
    ref = CorpusRef(
        corpus=name,
        split=split,
        tokens=ids.numel(),
        window=window,
        seed=seed,
        sha256=token_ids_sha256(ids),
    )
    return ids, ref


def calibration_windows(
    tokenizer: Any,
    corpus: str | Path = "wikipedia",
    tokens: int = DEFAULT_CALIBRATION_TOKENS,
    window: int = DEFAULT_WINDOW,
    seed: int = SPLIT_SEED,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, CorpusRef]:
    """Calibration windows: the split that profiling and activation-aware compression see."""
    return corpus_windows(tokenizer, corpus, "calibration", tokens, window, seed, cache_dir)


def evaluation_windows(
    tokenizer: Any,
    corpus: str | Path = "wikipedia",
    tokens: int = DEFAULT_EVALUATION_TOKENS,
    window: int = DEFAULT_WINDOW,
    seed: int = SPLIT_SEED,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, CorpusRef]:
    """Evaluation windows: disjoint from calibration by document, for perplexity."""
    return corpus_windows(tokenizer, corpus, "evaluation", tokens, window, seed, cache_dir)
