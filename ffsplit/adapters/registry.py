"""Adapter registry: architecture name -> adapter. Adding an architecture = one file + one line."""

from __future__ import annotations

from torch import nn

from ffsplit.adapters.base import Adapter, architecture_of
from ffsplit.adapters.bert import BertAdapter
from ffsplit.adapters.gemma3 import Gemma3Adapter
from ffsplit.adapters.gpt2 import GPT2Adapter
from ffsplit.adapters.gpt_neox import GPTNeoXAdapter
from ffsplit.adapters.llama import LlamaAdapter
from ffsplit.adapters.mpnet import MPNetAdapter
from ffsplit.adapters.opt import OPTAdapter
from ffsplit.errors import FFSplitError

ADAPTERS: tuple[type[Adapter], ...] = (
    LlamaAdapter,
    Gemma3Adapter,
    OPTAdapter,
    GPT2Adapter,
    GPTNeoXAdapter,
    BertAdapter,
    MPNetAdapter,
)

_BY_ARCHITECTURE = {arch: cls for cls in ADAPTERS for arch in cls.architectures}
_BY_NAME = {cls.name: cls for cls in ADAPTERS}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def adapter_for_architecture(architecture: str) -> Adapter:
    cls = _BY_ARCHITECTURE.get(architecture)
    if cls is None:
        raise FFSplitError(
            f"unsupported architecture '{architecture}'; supported: "
            f"{', '.join(supported_architectures())}"
        )
    return cls()


def adapter_by_name(name: str) -> Adapter:
    if name not in _BY_NAME:
        raise FFSplitError(f"unknown adapter '{name}'; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]()


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model, chosen by its HF architecture name."""
    return adapter_for_architecture(architecture_of(model))
