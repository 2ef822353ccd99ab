"""The champion policy: which registered variant the `champion` alias names.

Pure functions of candidate dicts (a version's metrics plus name, version, series). A candidate is
eligible when its quality loss is within the budget and its speed (or size) is known. Speed is the
GPU's when the evaluation had one (gpu_decode_speedup_b1, else gpu_prefill_speedup), else the CPU
race's (decode_speedup, else prefill_speedup for encoders), each with the interval of its paired,
interleaved rounds (`<metric>_low`, `<metric>_high`; ffsplit.eval.latency.Speedup).

objective "speed": the fastest candidate leads; every candidate whose interval reaches the
leader's is tied with it (the race could not tell them apart), and the tie goes to the fewest
bytes, then the smaller quality loss. A baseline (uniform, random split, pruning) is champion only
if it wins outside the noise: when any FFSplit variant ties, the baselines drop out of the tie.
objective "size": the fewest bytes, then the smaller loss, then the faster. Every rule ends in the
version number and the name, so the choice is the same for any input order.

"Fewest bytes" is within SIZE_TIE of the smallest: variants made for one budget differ by a few
hundred bytes of a 170 MB model (each method meets the same target by its own rounding), and
those bytes must not buy a worse model (the sweep once crowned a column-outlier baseline at +1.2%
perplexity over FFSplit's +0.7% for 300 fewer bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ffsplit.errors import FFSplitError

PERPLEXITY_CHANGE = "perplexity_change_pct"
ACCURACY_CHANGE = "accuracy_change_pct"
BYTES = "bytes"
# Speed metrics in order of preference: the GPU's when measured, else the CPU race's.
SPEED_METRICS = (
    "gpu_decode_speedup_b1",
    "gpu_prefill_speedup",
    "decode_speedup",
    "prefill_speedup",
)
OBJECTIVES = ("speed", "size")
SIZE_TIE = 0.001  # sizes within 0.1% of the smallest count as equal (see the module docstring)


def finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def quality_loss(candidate: Mapping[str, Any]) -> float | None:
    """Quality lost in %: the perplexity increase, else minus the accuracy change; None if unknown."""
    for key, sign in ((PERPLEXITY_CHANGE, 1.0), (ACCURACY_CHANGE, -1.0)):
        value = candidate.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return sign * float(value) if math.isfinite(value) else None
    return None


@dataclass(frozen=True)
class Speed:
    """A candidate's speedup (metric name, median, interval; the interval is the median itself
    when the record has none, e.g. runs logged before intervals were)."""

    metric: str
    median: float
    low: float
    high: float


def speed_of(candidate: Mapping[str, Any]) -> Speed | None:
    """The candidate's speed by the metric preference (SPEED_METRICS), or None."""
    for metric in SPEED_METRICS:
        median = finite(candidate.get(metric))
        if median is None:
            continue
        low = finite(candidate.get(f"{metric}_low"))
        high = finite(candidate.get(f"{metric}_high"))
        if low is None or high is None:
            low = high = median
        return Speed(metric, median, min(low, median), max(high, median))
    return None


def is_baseline(candidate: Mapping[str, Any]) -> bool:
    """A method.md baseline (series uniform-*, random-*, prune*), not FFSplit itself."""
    series = str(candidate.get("series") or "")
    return bool(series) and not series.startswith(("ffsplit", "split"))


def _identity(candidate: Mapping[str, Any]) -> tuple[float, str]:
    version = str(candidate.get("version", ""))
    return (
        int(version) if version.isdigit() else math.inf,
        str(candidate.get("name", candidate.get("run_id", ""))),
    )


def _size(candidate: Mapping[str, Any]) -> float:
    size = finite(candidate.get(BYTES))
    return math.inf if size is None else size


def _near_smallest(pool: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The entries whose size is within SIZE_TIE of the pool's smallest."""
    smallest = min(_size(e[0]) for e in pool)
    return [e for e in pool if _size(e[0]) <= smallest * (1 + SIZE_TIE)]


def _fastest_outside_noise(
    eligible: list[tuple[Mapping[str, Any], float, Speed]],
) -> Mapping[str, Any]:
    """The speed objective over (candidate, loss, speed) triples (see the module docstring)."""
    leader = max(eligible, key=lambda e: (e[2].median, -_size(e[0]), -e[1]))
    tied = [e for e in eligible if e[2].high >= leader[2].low]
    split = [e for e in tied if not is_baseline(e[0])]
    pool = _near_smallest(split or tied)
    return min(pool, key=lambda e: (e[1], _size(e[0]), -e[2].median, *_identity(e[0])))[0]


def choose_champion(
    candidates: Sequence[Mapping[str, Any]],
    quality_budget_pct: float,
    objective: Literal["speed", "size"] = "speed",
) -> Mapping[str, Any] | None:
    """The champion under the policy of the module docstring, or None when no candidate is within
    the budget. The dense reference competes like any candidate if passed (callers leave it out).
    """
    budget = finite(quality_budget_pct)
    if budget is None or budget < 0:
        raise FFSplitError(
            f"quality budget must be a finite percentage >= 0, got {quality_budget_pct!r}"
        )
    if objective not in OBJECTIVES:
        raise FFSplitError(f"objective must be 'speed' or 'size', got {objective!r}")
    eligible = []
    for c in candidates:
        loss, speed = quality_loss(c), speed_of(c)
        if loss is None or loss > budget:
            continue
        if objective == "speed" and speed is None:
            continue
        if objective == "size" and finite(c.get(BYTES)) is None:
            continue
        eligible.append((c, loss, speed))
    if not eligible:
        return None
    if objective == "speed":
        return _fastest_outside_noise(eligible)  # type: ignore[arg-type]

    def by_loss(e: tuple[Mapping[str, Any], float, Speed | None]) -> tuple:
        faster = -e[2].median if e[2] is not None else math.inf
        return (e[1], _size(e[0]), faster, *_identity(e[0]))

    return min(_near_smallest(eligible), key=by_loss)[0]
