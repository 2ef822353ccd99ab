"""Compress stage on Ray; results do not depend on the number of workers (1 vs 3, bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffsplit.config import ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.profiling import load_stats
from ffsplit.variant.shards import load_shard
from tasks import cache
from tasks.aggregate import aggregate, aggregate_path, heavy_sets, stats_file
from tasks.compress import compress_shard, layer_shards, shard_path
from tasks.profile import profile_unit, unit_paths
from tasks.records import BaseModel

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)
RECIPES = [
    Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3, profile=PROFILE),
    Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.5, profile=PROFILE),
    Recipe(method="prune", ffn_reduction=0.3, profile=PROFILE),
]
UNITS = 4


def test_layer_shards_partition_in_order() -> None:
    assert layer_shards(30, 4) == [
        list(range(0, 8)),
        list(range(8, 15)),
        list(range(15, 22)),
        list(range(22, 30)),
    ]
    assert layer_shards(3, 8) == [[0], [1], [2]]
    assert layer_shards(5, 1) == [[0, 1, 2, 3, 4]]
    with pytest.raises(FFSplitError, match="compress_shards"):
        layer_shards(4, 0)


def _pipeline(model: str, root: Path, slot: str) -> dict:
    """Profile units, aggregate, compress every recipe's shards with at most 1 or 3 tasks at once."""
    base = BaseModel.resolve(model)
    resources = {"num_cpus": 1, "resources": {slot: 1}}
    paths = unit_paths(str(root), base, PROFILE, UNITS)
    units = profile_unit.run_many(
        [
            {"model": base, "profile": PROFILE.to_dict(), "unit": i, "units": UNITS, "out": out}
            for i, out in enumerate(paths)
        ],
        resources=resources,
    )
    out = aggregate_path(str(root), paths)
    merged = aggregate.run(model=base, unit_paths=paths, out=out)
    shards = {}
    calls = []
    for recipe in RECIPES:
        for layers in layer_shards(4, 3):
            path = shard_path(str(root), base, merged.key, recipe, layers)
            calls.append(
                {
                    "model": base,
                    "stats_path": str(stats_file(out)),
                    "recipe": recipe.to_dict(),
                    "layers": layers,
                    "out": path,
                }
            )
            shards[(recipe.label, tuple(layers))] = path
    results = compress_shard.run_many(calls, resources=resources)
    return {"units": units, "aggregate": out, "shards": shards, "results": results}


def test_one_worker_and_three_workers_give_identical_results(
    tiny_lm: str, ray_cluster: dict, tmp_path: Path
) -> None:
    one = _pipeline(tiny_lm, tmp_path / "one", "one_worker")
    three = _pipeline(tiny_lm, tmp_path / "three", "three_workers")
    assert not any(r.cached for r in one["results"] + three["results"])
    for ratio in (0.1, 0.3):
        assert heavy_sets(one["aggregate"], ratio) == heavy_sets(three["aggregate"], ratio)
    a, b = load_stats(stats_file(one["aggregate"])), load_stats(stats_file(three["aggregate"]))
    for i in a.layers:
        for field in ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden"):
            assert torch.equal(getattr(a.layers[i], field), getattr(b.layers[i], field))
    assert one["shards"].keys() == three["shards"].keys()
    for name, path in one["shards"].items():
        x, y = load_shard(path), load_shard(three["shards"][name])
        assert sorted(x.layers) == sorted(y.layers)
        for layer in x.layers:
            assert torch.equal(x.layers[layer].heavy_neurons, y.layers[layer].heavy_neurons)
            for m1, m2 in zip(x.layers[layer].modules, y.layers[layer].modules, strict=True):
                if m1 is None:
                    assert m2 is None
                    continue
                s1, s2 = m1.state_dict(), m2.state_dict()
                assert s1.keys() == s2.keys()
                assert all(torch.equal(s1[k], s2[k]) for k in s1), (name, layer)
    # the content keys are equal too: the same inputs, whatever ran them
    assert [Path(p).name for p in one["shards"].values()] == [
        Path(p).name for p in three["shards"].values()
    ]


def test_shards_are_cached_and_need_statistics(
    tiny_lm: str, ray_cluster: dict, tmp_path: Path
) -> None:
    base = BaseModel.resolve(tiny_lm)
    uniform = Recipe(
        method=QuantConfig(group_size=32, allocation="two-level", gptq=False, gptq_down=False),
        selection="none",
        ffn_reduction=0.5,
        profile=PROFILE,
    )
    layers = [0, 1, 2, 3]
    path = shard_path(str(tmp_path), base, None, uniform, layers)

    def shard(recipe: dict, layers: list[int], out: str):  # noqa: ANN202
        return compress_shard.run(
            model=base, stats_path=None, recipe=recipe, layers=layers, out=out
        )

    first = shard(uniform.to_dict(), layers, path)
    stamp = (Path(path) / "shard.safetensors").stat().st_mtime_ns
    again = shard(uniform.to_dict(), layers, path)
    assert not first.cached and again.cached
    assert again.bytes == first.bytes < first.dense_bytes
    assert (Path(path) / "shard.safetensors").stat().st_mtime_ns == stamp
    scored = RECIPES[0].to_dict()
    out = cache.shard_dir(tmp_path, "x")
    with pytest.raises(FFSplitError, match="needs calibration statistics"):
        shard(scored, [0], str(out))
    with pytest.raises(FFSplitError, match="no FFN layer 7"):
        shard(uniform.to_dict(), [7], str(out))
    assert not out.exists()
