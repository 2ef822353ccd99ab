"""Profiling: per-neuron statistics over calibration text (pure stats + model hooks)."""

from ffsplit.profiling.profiler import profile_model
from ffsplit.profiling.stats import (
    LayerStats,
    ModelStats,
    load_stats,
    merge,
    merge_all,
    observe,
    save_stats,
)

__all__ = [
    "LayerStats",
    "ModelStats",
    "load_stats",
    "merge",
    "merge_all",
    "observe",
    "profile_model",
    "save_stats",
]
