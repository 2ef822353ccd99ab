"""The observation behind FFSplit (issue 6): concentration of neuron output norm, hit frequency,
stability of the heavy set across corpora, and the ablation of heavy against random neurons."""

from ffsplit.analysis.ablation import (
    ablation,
    ablation_sets,
    count_coverage,
    down_weights,
    hidden_state_error,
    zero_neurons,
)
from ffsplit.analysis.observation import (
    SHARE_PERCENTS,
    CoverageCounts,
    coverage_counts,
    coverage_summary,
    expected_random_jaccard,
    gini,
    heavy_set_stability,
    heavy_sets,
    layer_observation,
    merge_coverage,
    model_observation,
)

__all__ = [
    "SHARE_PERCENTS",
    "CoverageCounts",
    "ablation",
    "ablation_sets",
    "count_coverage",
    "coverage_counts",
    "coverage_summary",
    "down_weights",
    "expected_random_jaccard",
    "gini",
    "heavy_set_stability",
    "heavy_sets",
    "hidden_state_error",
    "layer_observation",
    "merge_coverage",
    "model_observation",
    "zero_neurons",
]
