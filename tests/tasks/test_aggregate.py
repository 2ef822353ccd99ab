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
from ffsplit.profiling import load_stats
from ffsplit.selection import heavy_count, neuron_scores, order_by_score
from tasks.aggregate import SUMMARY_FILE, aggregate, aggregate_path, heavy_sets, stats_file
from tasks.profile import profile_unit, unit_paths
from tasks.records import BaseModel

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)


@pytest.fixture(scope="module")
def units(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("agg-cache")
    base = BaseModel.resolve(tiny_lm)
    plan = unit_paths(str(root), base, PROFILE, 3)
    profile_unit.run_many(
        [
            {"model": base, "profile": PROFILE.to_dict(), "unit": i, "units": 3, "out": out}
            for i, out in enumerate(plan)
        ]
    )
    return {"base": base, "plan": plan, "root": str(root)}


def _aggregate(tiny_lm: str, units: dict) -> tuple[str, dict]:
    out = aggregate_path(units["root"], units["plan"])
    record = aggregate.run(model=units["base"], unit_paths=units["plan"], out=out)
    return out, record


def test_merge_is_the_left_fold_in_unit_order(tiny_lm: str, units: dict) -> None:
    out, record = _aggregate(tiny_lm, units)
    parts = [load_stats(p) for p in units["plan"]]
    expected = parts[0].merged(parts[1]).merged(parts[2])
    merged = load_stats(stats_file(out))
    assert merged.tokens == record.tokens == 512
    assert record.units == 3 and record.calibration["units"] == 3
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
    again = aggregate.task.fn(model=units["base"], unit_paths=units["plan"], out=out)
    assert again.cached and stats_file(out).stat().st_mtime_ns == stamp


def test_statistics_of_another_model_are_refused(tiny_lm: str, units: dict, tmp_path: Path) -> None:
    with pytest.raises(FFSplitError, match="collected on model"):
        base = units["base"]
        other = BaseModel(base.name, "f" * 64, base.layers, base.path)
        aggregate.run(model=other, unit_paths=units["plan"], out=str(tmp_path / "agg"))
    assert not (tmp_path / "agg").exists()
