"""Healing: a short distillation of the compressed FFNs against the dense model (issue 6).

Kept apart from ffsplit.compress on purpose: the pipeline keys compressed shards by the source of
ffsplit.compress, and a change to healing must not invalidate compression results.
"""

from ffsplit.heal.distill import (
    HealReport,
    ffn_inputs,
    ffn_output,
    heal,
    relative_error,
    trainable_parameters,
)

__all__ = [
    "HealReport",
    "ffn_inputs",
    "ffn_output",
    "heal",
    "relative_error",
    "trainable_parameters",
]
