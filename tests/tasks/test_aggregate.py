"""Aggregate stage: a fixed left fold over units, scores and heavy sets, cached by content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.loading import load_model
from ffsplit.models.registry import resolve_model
from ffsplit.profiling import load_stats
from ffsplit.selection import heavy_count, neuron_scores, order_by_score
from tasks.aggregate import (
    SUMMARY_FILE,
    aggregate,
    aggregate_job,
    aggregate_path,
    heavy_sets,
    stats_file,
)
from tasks.profile import run_units, unit_plan
from tasks.runtime import run_remote, task_resources

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)


@pytest.fixture(scope="module")
def units(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("agg-cache")
    sha = resolve_model(tiny_lm).weights_sha256
    plan = unit_plan(sha, PROFILE.to_dict(), 3, str(root))
    run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    return {"sha": sha, "plan": plan, "root": str(root)}


def _aggregate(tiny_lm: str, units: dict) -> tuple[str, dict]:
    key, out = aggregate_path(units["root"], [p["key"] for p in units["plan"]])
    record = run_remote(
        aggregate_job,
        tiny_lm,
        units["sha"],
        [p["path"] for p in units["plan"]],
        out,
        resources=task_resources(),
    )
    return out, record


def test_merge_is_the_left_fold_in_unit_order(tiny_lm: str, units: dict) -> None:
    out, record = _aggregate(tiny_lm, units)
    parts = [load_stats(p["path"]) for p in units["plan"]]
    expected = parts[0].merged(parts[1]).merged(parts[2])
    merged = load_stats(stats_file(out))
    assert merged.tokens == record["tokens"] == 512
    assert record["units"] == 3 and record["calibration"]["units"] == 3
    assert "shard" not in merged.meta["calibration"]
    for i, layer in expected.layers.items():
        for field in ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden"):
            assert torch.equal(getattr(merged.layers[i], field), getattr(layer, field)), field


def test_heavy_sets_are_the_top_scores(tiny_lm: str, units: dict) -> None:
    out, record = _aggregate(tiny_lm, units)
    merged = load_stats(stats_file(out))
    net, _, _ = load_model(tiny_lm)
    adapter = get_adapter(net)
    for ratio in (0.05, 0.25):
        sets = heavy_sets(out, ratio)
        assert sorted(sets) == [0, 1, 2, 3]
        for handle in adapter.ffns(net):
            down = adapter.weights(net, handle).down
            order = order_by_score(neuron_scores(merged.layers[handle.layer], down))
            want = sorted(order[: heavy_count(order.numel(), ratio)].tolist())
            assert sets[handle.layer] == want
    summary = json.loads((Path(out) / SUMMARY_FILE).read_text())
    assert set(summary["layers"]["0"]) >= {"top1_share", "top10_share", "neurons"}
    assert 0 < summary["layers"]["0"]["top10_share"] <= 1


def test_second_run_is_a_cache_hit(tiny_lm: str, units: dict) -> None:
    out, _ = _aggregate(tiny_lm, units)
    stamp = stats_file(out).stat().st_mtime_ns
    again = aggregate.fn(tiny_lm, units["sha"], [p["path"] for p in units["plan"]], out)
    assert again["cached"] and stats_file(out).stat().st_mtime_ns == stamp


def test_statistics_of_another_model_are_refused(tiny_lm: str, units: dict, tmp_path: Path) -> None:
    with pytest.raises(FFSplitError, match="collected on model"):
        run_remote(
            aggregate_job,
            tiny_lm,
            "f" * 64,
            [p["path"] for p in units["plan"]],
            str(tmp_path / "agg"),
            resources=task_resources(),
        )
    assert not (tmp_path / "agg").exists()
