"""Tiny random models built from configs, for mechanics tests of every supported architecture.

No OPT, GPT-2, GPT-NeoX or tiny-random checkpoint ships with weights offline, so these are the only
way to exercise those code paths (docs/assets.md). Built offline, fp32, eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ffsplit.errors import FFSplitError

HIDDEN = 32
INTERMEDIATE = 96
LAYERS = 2
HEADS = 4
VOCAB = 160
POSITIONS = 128


def _llama_like(config_class: Callable[..., Any]) -> Any:
    """Llama, Qwen2 and Mistral share the gated (SwiGLU) config fields; grouped-query attention."""
    return config_class(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=False,
    )


def _llama() -> Any:
    from transformers import LlamaConfig

    return _llama_like(LlamaConfig)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return _llama_like(Qwen2Config)


def _mistral() -> Any:
    from transformers import MistralConfig

    return _llama_like(MistralConfig)


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=POSITIONS,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )


def _opt() -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        word_embed_proj_dim=HIDDEN,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=POSITIONS,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
    )


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
    )


def _mpnet() -> Any:
    from transformers import MPNetConfig

    return MPNetConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
    )


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "LlamaForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "MistralForCausalLM": _mistral,
    "Gemma3ForCausalLM": _gemma3,
    "OPTForCausalLM": _opt,
    "GPT2LMHeadModel": _gpt2,
    "GPTNeoXForCausalLM": _gpt_neox,
    "BertModel": _bert,
    "MPNetModel": _mpnet,
}
TINY_ARCHITECTURES: tuple[str, ...] = tuple(TINY_CONFIGS)


def tiny_config(architecture: str) -> Any:
    """The tiny HF config of an architecture (2 layers, hidden 32, FFN 96, vocab 160)."""
    build = TINY_CONFIGS.get(architecture)
    if build is None:
        raise FFSplitError(
            f"no tiny model for architecture {architecture!r}: known are {', '.join(TINY_CONFIGS)}"
        )
    config = build()
    config.architectures = [architecture]
    return config


def tiny_model(architecture: str, seed: int = 0) -> tuple[torch.nn.Module, None]:
    """(random fp32 model in eval mode, None): same seed, same weights; the global RNG is untouched.

    No tokenizer: tests feed token ids below the tiny vocabulary size (160).
    """
    import transformers

    config = tiny_config(architecture)
    model_class = getattr(transformers, architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
    model.eval()
    return model, None


def _save_with_tokenizer(
    build: Callable[[Any], Any], tokenizer_of: str, folder: Path, seed: int
) -> Path:
    """Save the random model `build(tokenizer)` makes, seeded, with a packaged model's tokenizer."""
    from transformers import AutoTokenizer

    from ffsplit.models.registry import materialize

    tokenizer = AutoTokenizer.from_pretrained(str(materialize(tokenizer_of)), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(tokenizer).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def save_tiny_with_tokenizer(
    architecture: str, tokenizer_of: str, folder: str | Path, seed: int = 0
) -> Path:
    """A tiny model of `architecture` (tiny_config) saved as a HF folder with the real tokenizer
    of a packaged model (vocabulary widened to it), so tests can feed it real text."""
    import transformers

    def build(tokenizer: Any) -> Any:
        config = tiny_config(architecture)
        config.vocab_size = len(tokenizer)
        return getattr(transformers, architecture)(config)

    return _save_with_tokenizer(build, tokenizer_of, Path(folder), seed)


def save_tiny_lm(folder: str | Path, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny Llama (d=64, FFN 192, tied embeddings) with SmolLM2's real tokenizer, saved
    as a HF folder: the pipeline tests' base model (real text, seconds per stage on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tokenizer: Any) -> Any:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return LlamaForCausalLM(config)

    return _save_with_tokenizer(build, "smollm2-135m", Path(folder), seed)
