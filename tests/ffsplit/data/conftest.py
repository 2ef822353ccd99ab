"""A character-level fast tokenizer built offline, so window arithmetic can be checked exactly."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import pytest

SPECIAL = {"[UNK]": 0, "<eos>": 1, "<bos>": 2, "<sep>": 3}
CHARS = sorted(set(string.printable))
VOCAB = {**SPECIAL, **{c: i + len(SPECIAL) for i, c in enumerate(CHARS)}}


def build_char_tokenizer(eos: bool = True, bos: bool = False, sep: bool = False) -> Any:
    """Each character one token; optional eos, and optional framing (<bos> before, <sep> after)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    template = " ".join([*(["<bos>"] if bos else []), "$A", *(["<sep>"] if sep else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", VOCAB["<bos>"]), ("<sep>", VOCAB["<sep>"])]
    )
    options: dict[str, str] = {"unk_token": "[UNK]"}
    if eos:
        options["eos_token"] = "<eos>"
    if bos:
        options["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)


@pytest.fixture
def char_tokenizer() -> Callable[..., Any]:
    """Factory: char_tokenizer(eos=True, bos=False, sep=False)."""
    return build_char_tokenizer


@pytest.fixture
def char_vocab() -> dict[str, int]:
    """The character tokenizer's vocabulary: one id per printable character, specials first."""
    return dict(VOCAB)
