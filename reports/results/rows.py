"""What the results page is made of: `Row` (one registered variant or dense reference), where the
rows came from (`Source`, `ObservationRun`), the series the page compares and its thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The paper's headline size cut (method.md: "43.1% smaller model"); our goal asks it of the FFN.
GOAL_REDUCTION = 0.431
# Achieved reductions are rounded by the budget solver: 43.05% and up reads as 43.1%.
GOAL_TOLERANCE = 0.0005
GOAL_QUALITY_PCT = 1.0  # at most +1% perplexity (issue 6)
# Two variants "save the same bytes" when their achieved FFN reductions differ by at most this.
EQUAL_BYTES_TOLERANCE = 0.005
FLOAT_BYTES = 2  # ffsplit/eval/size.py: dense float weights count 16 bits
RUN_DIR_TAG = "ffsplit.run_dir"
COMMAND_TAG = "ffsplit.command"
# Probe accuracy's test-set size: logged by tasks.evaluate.metrics, else in the evaluation record.
TEST_EXAMPLES_METRIC = "accuracy_test_examples"
RECORD_ARTIFACT = "eval/record.json"  # flows.sweep / flows.compress log ffsplit.jobs' record here
Z95 = 1.96  # two-sided 95% normal quantile: intervals and the noise rule

# Series are Recipe.series (ffsplit/config.py): the line of a recipe in the charts.
FFSPLIT_SERIES = ("ffsplit-lowrank", "ffsplit-quant")
BASELINE_SERIES = ("uniform-lowrank", "uniform-quant", "random-lowrank", "random-quant", "prune")
# Series with a heavy set whose size was swept (the heavy-ratio curves).
SPLIT_SERIES = (*FFSPLIT_SERIES, "random-lowrank", "random-quant")
# The uniform baseline (no split) of each FFSplit series: the heavy-ratio curves' ρ = 0.
UNIFORM_OF = {"ffsplit-lowrank": "uniform-lowrank", "ffsplit-quant": "uniform-quant"}
SERIES_TITLES = {
    "ffsplit-lowrank": "FFSplit low-rank",
    "ffsplit-quant": "FFSplit quant",
    "uniform-lowrank": "uniform low-rank",
    "uniform-quant": "uniform quant",
    "random-lowrank": "random split low-rank",
    "random-quant": "random split quant",
    "prune": "score pruning",
    "prune-random": "random pruning",
    "outlier-quant": "column outliers quant",
    "dense": "dense",
    "split": "split only",
}
SERIES_COLORS = {
    "ffsplit-lowrank": "tab:blue",
    "ffsplit-quant": "tab:red",
    "uniform-lowrank": "tab:cyan",
    "uniform-quant": "tab:orange",
    "random-lowrank": "tab:purple",
    "random-quant": "tab:pink",
    "prune": "tab:gray",
}
SERIES_MARKERS = {"ffsplit-lowrank": "o", "ffsplit-quant": "s", "prune": "x"}
# Like-for-like baselines of each FFSplit method (same compressor, or the pruning end of the range).
MATCHED_BASELINES = {
    "ffsplit-lowrank": ("uniform-lowrank", "random-lowrank", "prune"),
    "ffsplit-quant": ("uniform-quant", "random-quant", "prune"),
}


@dataclass(frozen=True)
class Row:
    """One registered variant (or dense reference) as the page sees it."""

    model: str
    run_id: str
    label: str
    series: str  # Recipe.series
    method: str  # Recipe.method_name
    heavy_ratio: float  # Recipe.heavy: 0 where there is no heavy set
    budget: float  # the recipe's target FFN reduction (fraction of FFN bytes)
    metrics: Mapping[str, float] = field(default_factory=dict)
    setting: str = ""  # non-default recipe options, "" for the defaults (healing included)
    heal_steps: int = 0
    selection: str = "score"
    gptq: bool | None = None  # quant rows: GPTQ rounding (False: round to nearest); else None
    start_time: int = 0  # ms since the epoch (MLflow run start)
    experiment: str = ""
    version: str = ""  # "name vN" of its registered model version, "" if none
    flow: str = ""
    variant_key: str = ""
    git_commit: str = ""
    run_dir: str = ""  # the flow's run folder, else the record folder that was logged
    command: str = ""  # the command that logged the run (params["command"] computed the record)
    test_examples: int | None = None  # accuracy rows: the probe's test-set size n, None = unknown
    # Filled by with_reference from the model's dense row:
    loss: float | None = None  # quality loss in % (perplexity increase, or accuracy drop)
    model_reduction: float | None = None
    ffn_param_reduction: float | None = None

    @property
    def is_dense(self) -> bool:
        return self.series == "dense"

    @property
    def healed(self) -> bool:
        return self.heal_steps > 0

    @property
    def ffn_reduction(self) -> float | None:
        """Achieved FFN byte reduction (logged), not the target budget."""
        return finite(self.metrics.get("ffn_reduction"))

    @property
    def quality_kind(self) -> str:
        return "perplexity" if "perplexity" in self.metrics else "accuracy"

    @property
    def quality(self) -> float | None:
        return finite(self.metrics.get(self.quality_kind))

    @property
    def accuracy_stderr(self) -> float | None:
        """Binomial standard error sqrt(p(1-p)/n) of a probe accuracy; None for perplexity rows
        and where n is unknown."""
        p = self.quality
        if self.quality_kind != "accuracy" or p is None or not self.test_examples:
            return None
        return math.sqrt(max(p * (1.0 - p), 0.0) / self.test_examples)


@dataclass(frozen=True)
class ObservationRun:
    """One model's latest complete observation run (tracking.observation.log_observation): its
    scalar metrics, per-layer series (metric steps = layer index) and plot files."""

    model: str
    run_id: str
    experiment: str = ""
    start_time: int = 0
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    series: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    plots: Mapping[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    run_dir: str = ""  # the flow's run folder, else the record folder that was logged
    command: str = ""  # the command that logged the run (params["command"] computed the record)


@dataclass(frozen=True)
class Source:
    """Where the rows came from (the page's provenance)."""

    uri: str  # redacted
    experiments: tuple[tuple[str, str], ...]  # (name, id)
    runs_read: int
    incomplete: int
    duplicates: int
    # The latest complete observation run of each model (tracking.observation), by model name.
    observations: tuple[ObservationRun, ...] = ()


def finite(value: Any) -> float | None:
    """A finite real number as float, else None (bools are not numbers here)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def count(value: Any) -> int | None:
    """A positive whole number (a test-set size), else None."""
    number = finite(value)
    if number is None or number < 1 or number != int(number):
        return None
    return int(number)


def record_test_examples(record: Any) -> int | None:
    """record["eval"]["test"] of an evaluation record (ffsplit.jobs.evaluate_job), None if the
    record has no positive whole test-set size."""
    evaluation = record.get("eval") if isinstance(record, Mapping) else None
    return count(evaluation.get("test")) if isinstance(evaluation, Mapping) else None
