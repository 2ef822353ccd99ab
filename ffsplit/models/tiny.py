"""Tiny random models built from configs, for mechanics tests of every supported architecture.

No OPT, GPT-2, GPT-NeoX or tiny-random checkpoint ships with weights offline, so these are the only
way to exercise those code paths (../shared/docs/assets.md). Built offline, fp32, eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
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


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "LlamaForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "MistralForCausalLM": _mistral,
    "Gemma3ForCausalLM": _gemma3,
    "OPTForCausalLM": _opt,
    "GPT2LMHeadModel": _gpt2,
    "GPTNeoXForCausalLM": _gpt_neox,
    "BertModel": _bert,
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
