"""tracking/champion.py: speed within the noise is a tie (fewer bytes, then less loss, win it); a
baseline is champion only when it wins outside the noise; GPU speed first when measured."""

from __future__ import annotations

import pytest

from ffsplit.errors import FFSplitError
from tracking.champion import choose_champion, speed_of


def cand(version: int, series: str, **metrics: float) -> dict:
    return {"name": "m", "version": str(version), "series": series, **metrics}


def race(median: float, low: float, high: float) -> dict[str, float]:
    return {"decode_speedup": median, "decode_speedup_low": low, "decode_speedup_high": high}


def test_a_baseline_that_wins_inside_the_noise_is_not_champion() -> None:
    """The README demo's case: a random-split variant of the same size and format raced 1.18x on
    a busy CPU against neighbours at 0.72-0.91x; its interval overlapped theirs."""
    rows = [
        cand(1, "ffsplit-quant", perplexity_change_pct=0.1, bytes=700, **race(0.91, 0.70, 1.25)),
        cand(2, "random-quant", perplexity_change_pct=0.2, bytes=700, **race(1.18, 0.80, 1.40)),
        cand(3, "uniform-quant", perplexity_change_pct=0.3, bytes=650, **race(0.72, 0.60, 0.90)),
    ]
    assert choose_champion(rows, 5.0)["version"] == "1"


def test_a_baseline_that_wins_outside_the_noise_is_champion() -> None:
    rows = [
        cand(1, "ffsplit-quant", perplexity_change_pct=0.1, bytes=700, **race(0.95, 0.90, 1.00)),
        cand(2, "prune", perplexity_change_pct=0.2, bytes=700, **race(1.60, 1.50, 1.70)),
    ]
    assert choose_champion(rows, 5.0)["version"] == "2"


def test_ties_go_to_fewer_bytes_then_less_loss() -> None:
    rows = [
        cand(1, "ffsplit-quant", perplexity_change_pct=0.5, bytes=800, **race(1.30, 1.10, 1.50)),
        cand(2, "ffsplit-quant", perplexity_change_pct=0.9, bytes=600, **race(1.20, 1.00, 1.40)),
        cand(3, "ffsplit-lowrank", perplexity_change_pct=0.1, bytes=600, **race(1.15, 0.9, 1.35)),
        cand(4, "ffsplit-lowrank", perplexity_change_pct=0.1, bytes=500, **race(0.80, 0.7, 0.95)),
    ]
    # 4 is slower outside the noise; of the tied 1-3, 2 and 3 have the fewest bytes, 3 less loss
    assert choose_champion(rows, 5.0)["version"] == "3"


def test_gpu_speed_comes_first_and_records_without_intervals_are_points() -> None:
    both = {"gpu_decode_speedup_b1": 1.6, "decode_speedup": 0.8}
    assert speed_of(both).metric == "gpu_decode_speedup_b1"
    point = speed_of({"decode_speedup": 1.2})
    assert (point.low, point.median, point.high) == (1.2, 1.2, 1.2)
    rows = [
        cand(
            1,
            "ffsplit-quant",
            perplexity_change_pct=0.1,
            decode_speedup=1.5,
            gpu_decode_speedup_b1=1.1,
        ),
        cand(
            2,
            "ffsplit-quant",
            perplexity_change_pct=0.1,
            decode_speedup=0.9,
            gpu_decode_speedup_b1=1.7,
        ),
    ]
    assert choose_champion(rows, 5.0)["version"] == "2"


def test_bad_policy_is_one_line() -> None:
    with pytest.raises(FFSplitError, match="objective"):
        choose_champion([], 1.0, "latency")  # type: ignore[arg-type]


def test_a_few_bytes_do_not_buy_a_worse_champion() -> None:
    """The low-bit sweep of SmolLM2 at 60%: every method meets the budget by its own rounding,
    so sizes differ by a few hundred bytes of 173.5 MB; the smaller loss must win that tie."""
    mb = 173.5e6
    rows = [
        cand(2, "ffsplit-quant", perplexity_change_pct=0.70, bytes=mb + 300),
        cand(8, "outlier-quant", perplexity_change_pct=1.20, bytes=mb),
        cand(6, "uniform-quant", perplexity_change_pct=1.10, bytes=mb + 100),
        cand(9, "ffsplit-quant", perplexity_change_pct=0.10, bytes=1.002 * mb),  # 0.2% larger
    ]
    assert choose_champion(rows, 2.0, "size")["version"] == "2"
    fast = {"decode_speedup": 1.2, "decode_speedup_low": 1.1, "decode_speedup_high": 1.3}
    assert choose_champion([{**r, **fast} for r in rows], 2.0, "speed")["version"] == "2"
