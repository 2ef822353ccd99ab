"""Real models that ship in pip packages (materialised into a cache), loading, tiny test models."""

from ffsplit.models.loading import is_causal_lm, load_model
from ffsplit.models.registry import (
    MODELS,
    ModelRef,
    PackagedModel,
    list_models,
    materialize,
    resolve_model,
)
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model

__all__ = [
    "MODELS",
    "TINY_ARCHITECTURES",
    "ModelRef",
    "PackagedModel",
    "is_causal_lm",
    "list_models",
    "load_model",
    "materialize",
    "resolve_model",
    "tiny_model",
]
