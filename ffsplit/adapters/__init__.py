"""Architecture adapters: the only place that knows where each model keeps its FFN."""

from ffsplit.adapters.base import Adapter, FFNHandle, FFNWeights, architecture_of, dense_ffn
from ffsplit.adapters.registry import (
    adapter_by_name,
    adapter_for_architecture,
    get_adapter,
    supported_architectures,
)

__all__ = [
    "Adapter",
    "FFNHandle",
    "FFNWeights",
    "adapter_by_name",
    "adapter_for_architecture",
    "architecture_of",
    "dense_ffn",
    "get_adapter",
    "supported_architectures",
]
