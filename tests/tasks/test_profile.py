"""Profile stage on Ray: one statistics file per calibration unit, cached by content; layer groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.loading import load_model
from ffsplit.profiling import load_stats, profile_model
from ffsplit.profiling.stats import pack_symmetric
from tasks.aggregate import merge_unit_stats
from tasks.profile import profile_unit, profile_unit_by_layer_groups, unit_paths
from tasks.records import BaseModel

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)  # 8 windows


@pytest.fixture(scope="module")
def base(tiny_lm: str) -> BaseModel:
    return BaseModel.resolve(tiny_lm)


def run_units(base: BaseModel, profile: dict, paths: list[str]) -> list:
    """Every unit as parallel Ray tasks (the profile stage without Prefect)."""
    calls = [
        {"model": base, "profile": profile, "unit": i, "units": len(paths), "out": out}
        for i, out in enumerate(paths)
    ]
    return profile_unit.run_many(calls)


def test_units_cover_every_window_once(
    tiny_lm: str, base: BaseModel, ray_cluster: dict, tmp_path
) -> None:
    plan = unit_paths(str(tmp_path), base, PROFILE, 4)
    assert len(set(plan)) == 4
    results = run_units(base, PROFILE.to_dict(), plan)
    assert [r.unit for r in results] == [0, 1, 2, 3]
    assert not any(r.cached for r in results)
    assert all(r.threads == 1 for r in results)  # fixed, whatever the number of workers
    parts = [load_stats(p) for p in plan]
    assert [s.meta["unit"] for s in parts] == [[u, 4] for u in range(4)]
    assert {s.meta["calibration"]["sha256"] for s in parts} == {
        parts[0].meta["calibration"]["sha256"]
    }
    merged = merge_unit_stats(plan)
    # the same statistics as one pass over all windows (float sums agree to rounding)
    from ffsplit.jobs import calibration_data

    net, tokenizer, _ = load_model(tiny_lm)
    windows, _ = calibration_data(tokenizer, PROFILE)
    whole = profile_model(net, windows, PROFILE)
    assert merged.tokens == whole.tokens == 512
    for i, layer in whole.layers.items():
        torch.testing.assert_close(merged.layers[i].sum_sq, layer.sum_sq, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(merged.layers[i].max_abs, layer.max_abs, rtol=1e-5, atol=1e-8)
        scale = float(layer.gram_in.abs().max())  # float32 batch products: compare at that scale
        torch.testing.assert_close(  # the merge keeps Grams packed
            merged.layers[i].gram_in, pack_symmetric(layer.gram_in), rtol=1e-4, atol=1e-5 * scale
        )
        assert int(merged.layers[i].hits.sum()) == int(layer.hits.sum())


def test_second_run_is_a_cache_hit(base: BaseModel, ray_cluster: dict, tmp_path) -> None:
    plan = unit_paths(str(tmp_path), base, PROFILE, 2)
    first = run_units(base, PROFILE.to_dict(), plan)
    stamps = [Path(p).stat().st_mtime_ns for p in plan]
    again = run_units(base, PROFILE.to_dict(), plan)
    one = profile_unit.run(model=base, profile=PROFILE.to_dict(), unit=1, units=2, out=plan[1])
    assert not any(r.cached for r in first)
    assert all(r.cached for r in again) and one.cached
    assert [Path(p).stat().st_mtime_ns for p in plan] == stamps
    # another calibration config is another key, hence new work
    other = unit_paths(str(tmp_path), base, PROFILE.replace(tokens=256), 2)
    assert set(other).isdisjoint(plan)


def test_layer_groups_equal_units_bitwise_under_a_memory_cap(
    base: BaseModel, ray_cluster: dict, tmp_path
) -> None:
    profile = PROFILE.to_dict()
    units = unit_paths(str(tmp_path), base, PROFILE, 2)
    groups = unit_paths(str(tmp_path), base, PROFILE, 2, "layer_groups", 2)
    run_units(base, profile, units)
    cap_mb = 4.0  # the tiny model holds 12.8 MB (its embedding); a group of two layers 0.4 MB
    with pytest.raises(FFSplitError, match="over the worker memory cap.*layer_groups"):
        profile_unit.run(
            model=base,
            profile=profile,
            unit=0,
            units=2,
            out=str(tmp_path / "whole.safetensors"),
            memory_cap_mb=cap_mb,
        )
    results = [
        profile_unit_by_layer_groups.run(
            model=base,
            profile=profile,
            unit=unit,
            units=2,
            out=out,
            group_size=2,
            memory_cap_mb=cap_mb,
        )
        for unit, out in enumerate(groups)
    ]
    assert [r.groups for r in results] == [((0, 1), (2, 3))] * 2
    assert all(r.max_group_weights_mb < cap_mb for r in results)
    for a, b in zip(units, groups, strict=True):
        sa, sb = load_stats(a), load_stats(b)
        assert sa.tokens == sb.tokens and sorted(sa.layers) == sorted(sb.layers)
        for i in sa.layers:
            for field in ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden"):
                assert torch.equal(getattr(sa.layers[i], field), getattr(sb.layers[i], field)), (
                    field
                )
    assert not list(tmp_path.rglob("*.work"))  # hand-off files are removed
    with pytest.raises(FFSplitError, match="memory cap"):
        profile_unit_by_layer_groups.run(
            model=base,
            profile=profile,
            unit=0,
            units=2,
            out=str(tmp_path / "tight.safetensors"),
            group_size=2,
            memory_cap_mb=0.1,
        )


def test_bad_plans_are_refused(base: BaseModel, ray_cluster: dict, tmp_path) -> None:
    with pytest.raises(FFSplitError, match="profile_mode"):
        unit_paths(str(tmp_path), base, PROFILE, 2, "bogus")
    profile = PROFILE.to_dict()
    with pytest.raises(FFSplitError, match="holds no windows"):
        out = str(tmp_path / "u.safetensors")
        profile_unit.run(model=base, profile=profile, unit=9, units=10, out=out)
    other = BaseModel(base.name, "0" * 64, base.layers, base.path)
    with pytest.raises(FFSplitError, match="differ from"):
        out = str(tmp_path / "v.safetensors")
        profile_unit.run(model=other, profile=profile, unit=0, units=2, out=out)
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "v.safetensors").exists()
