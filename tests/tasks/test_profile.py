"""Profile stage on Ray: one statistics file per calibration unit, cached by content; layer groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.loading import load_model
from ffsplit.models.registry import resolve_model
from ffsplit.profiling import load_stats, profile_model
from ffsplit.profiling.stats import pack_symmetric
from tasks.aggregate import merge_unit_stats
from tasks.profile import run_unit, run_units, unit_plan

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)  # 8 windows


@pytest.fixture(scope="module")
def sha(tiny_lm: str) -> str:
    return resolve_model(tiny_lm).weights_sha256


def test_units_cover_every_window_once(tiny_lm: str, sha: str, ray_cluster: dict, tmp_path) -> None:
    plan = unit_plan(sha, PROFILE.to_dict(), 4, str(tmp_path))
    assert len({p["key"] for p in plan}) == 4
    results = run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    assert [r["unit"] for r in results] == [0, 1, 2, 3]
    assert not any(r["cached"] for r in results)
    assert all(r["threads"] == 1 for r in results)  # fixed, whatever the number of workers
    parts = [load_stats(p["path"]) for p in plan]
    assert [s.meta["unit"] for s in parts] == [[u, 4] for u in range(4)]
    assert {s.meta["calibration"]["sha256"] for s in parts} == {
        parts[0].meta["calibration"]["sha256"]
    }
    merged = merge_unit_stats([p["path"] for p in plan])
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


def test_second_run_is_a_cache_hit(tiny_lm: str, sha: str, ray_cluster: dict, tmp_path) -> None:
    plan = unit_plan(sha, PROFILE.to_dict(), 2, str(tmp_path))
    first = run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    stamps = [Path(p["path"]).stat().st_mtime_ns for p in plan]
    again = run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    one = run_unit(tiny_lm, sha, PROFILE.to_dict(), 1, 2, plan[1]["path"])
    assert not any(r["cached"] for r in first)
    assert all(r["cached"] for r in again) and one["cached"]
    assert [Path(p["path"]).stat().st_mtime_ns for p in plan] == stamps
    # another calibration config is another key, hence new work
    other = unit_plan(sha, {**PROFILE.to_dict(), "tokens": 256}, 2, str(tmp_path))
    assert {p["key"] for p in other}.isdisjoint({p["key"] for p in plan})


def test_layer_groups_equal_units_bitwise_under_a_memory_cap(
    tiny_lm: str, sha: str, ray_cluster: dict, tmp_path
) -> None:
    profile = PROFILE.to_dict()
    units = unit_plan(sha, profile, 2, str(tmp_path))
    groups = unit_plan(sha, profile, 2, str(tmp_path), "layer_groups", 2)
    run_units(tiny_lm, sha, profile, units)
    cap_mb = 4.0  # the tiny model holds 12.8 MB (its embedding); a group of two layers 0.4 MB
    with pytest.raises(FFSplitError, match="over the worker memory cap.*layer_groups"):
        run_unit(
            tiny_lm,
            sha,
            profile,
            0,
            2,
            str(tmp_path / "whole.safetensors"),
            "units",
            memory_cap_mb=cap_mb,
        )
    results = [
        run_unit(
            tiny_lm, sha, profile, p["unit"], 2, p["path"], "layer_groups", 2, memory_cap_mb=cap_mb
        )
        for p in groups
    ]
    assert [r["groups"] for r in results] == [[[0, 1], [2, 3]]] * 2
    assert all(r["max_group_weights_mb"] < cap_mb for r in results)
    for a, b in zip(units, groups, strict=True):
        sa, sb = load_stats(a["path"]), load_stats(b["path"])
        assert sa.tokens == sb.tokens and sorted(sa.layers) == sorted(sb.layers)
        for i in sa.layers:
            for field in ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden"):
                assert torch.equal(getattr(sa.layers[i], field), getattr(sb.layers[i], field)), (
                    field
                )
    assert not list(tmp_path.rglob("*.work"))  # hand-off files are removed
    with pytest.raises(FFSplitError, match="memory cap"):
        run_unit(
            tiny_lm,
            sha,
            profile,
            0,
            2,
            str(tmp_path / "tight.safetensors"),
            "layer_groups",
            2,
            memory_cap_mb=0.1,
        )


def test_bad_plans_are_refused(tiny_lm: str, sha: str, ray_cluster: dict, tmp_path) -> None:
    with pytest.raises(FFSplitError, match="profile_mode"):
        unit_plan(sha, PROFILE.to_dict(), 2, str(tmp_path), "bogus")
    with pytest.raises(FFSplitError, match="holds no windows"):
        run_unit(tiny_lm, sha, PROFILE.to_dict(), 9, 10, str(tmp_path / "u.safetensors"))
    with pytest.raises(FFSplitError, match="differ from"):
        run_unit(tiny_lm, "0" * 64, PROFILE.to_dict(), 0, 2, str(tmp_path / "v.safetensors"))
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "v.safetensors").exists()
