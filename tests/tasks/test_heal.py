"""Heal stage: on Ray it gives the library's heal_job result, records itself in the manifest, and a
re-run is a cache hit; its key follows the assembled variant and the heal config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ffsplit.config import HealConfig, ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.jobs import heal_job
from ffsplit.variant import read_manifest
from ffsplit.variant.manifest import WEIGHTS
from tasks import cache
from tasks.aggregate import aggregate, aggregate_path, stats_file
from tasks.assemble import assemble, variant_path
from tasks.compress import compress_shard, layer_shards, shard_path
from tasks.heal import heal_variant
from tasks.profile import profile_unit, unit_paths
from tasks.records import BaseModel

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)
HEAL = HealConfig(steps=6, loss="local", lr=1e-3, tokens=512, window=64, batch_size=2)
RECIPE = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.4, profile=PROFILE, heal=HEAL)


@pytest.fixture(scope="module")
def assembled(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The unhealed variant of RECIPE, made by the pipeline's stages (profile .. assemble)."""
    root = tmp_path_factory.mktemp("heal-cache")
    base = BaseModel.resolve(tiny_lm)
    plan = unit_paths(str(root), base, PROFILE, 2)
    profile_unit.run_many(
        [
            {"model": base, "profile": PROFILE.to_dict(), "unit": i, "units": 2, "out": out}
            for i, out in enumerate(plan)
        ]
    )
    agg = aggregate_path(str(root), plan)
    record = aggregate.run(model=base, unit_paths=plan, out=agg)
    compression = RECIPE.unhealed()
    shards = [
        compress_shard.run(
            model=base,
            stats_path=str(stats_file(agg)),
            recipe=compression.to_dict(),
            layers=layers,
            out=shard_path(str(root), base, record.key, compression, layers),
        )
        for layers in layer_shards(4, 2)
    ]
    out = variant_path(str(root), base, [s.key for s in shards])
    assemble.run(
        model=base,
        recipe=compression.to_dict(),
        shard_paths=[s.path for s in shards],
        out=out,
        calibration=record.calibration,
    )
    return {"base": base, "root": root, "key": Path(out).name, "path": out}


def run_heal(base: BaseModel, variant: str, heal: dict, out: str):  # noqa: ANN201
    return heal_variant.run(model=base, variant=variant, heal=heal, out=out)


def test_unhealed_recipe_is_the_compression_alone() -> None:
    plain = RECIPE.unhealed()
    assert not plain.heal.enabled and plain.replace(heal=HEAL) == RECIPE
    assert plain.label == "lowrank-h0.10-r0.4" and RECIPE.label == "lowrank-h0.10-r0.4-heal6-local"


def test_heal_key_follows_the_variant_and_the_config() -> None:
    key = cache.heal_key("v" * 64, HEAL.to_dict())
    assert key == cache.heal_key("v" * 64, HealConfig.from_dict(HEAL.to_dict()).to_dict())
    assert key != cache.heal_key("w" * 64, HEAL.to_dict())
    assert key != cache.heal_key("v" * 64, HEAL.replace(steps=7).to_dict())
    assert key != cache.heal_key("v" * 64, HEAL.replace(loss="kl").to_dict())
    assert key != cache.variant_key("v" * 64, [])  # kinds never collide
    assert cache.healed_dir(Path("/c"), key) == Path("/c/healed") / key


def test_heal_stage_equals_the_library_job_and_is_cached(
    tiny_lm: str, assembled: dict, tmp_path: Path
) -> None:
    key = cache.heal_key(assembled["key"], HEAL.to_dict())
    out = cache.healed_dir(assembled["root"], key)
    result = run_heal(assembled["base"], assembled["path"], HEAL.to_dict(), str(out))
    assert not result.cached and result.label == RECIPE.label
    assert result.heal["steps"] == 6 and result.heal["after"] < result.heal["before"]
    manifest = read_manifest(out)
    assert Recipe.from_dict(manifest["recipe"]) == RECIPE
    assert manifest["heal"]["from_variant"]["path"] == assembled["path"]
    assert manifest["calibration"] == read_manifest(assembled["path"])["calibration"]
    assert manifest["sizes"] == read_manifest(assembled["path"])["sizes"]
    # the library's job on the same folder, at the task's thread count: the same weights
    threads = torch.get_num_threads()
    torch.set_num_threads(manifest["heal"]["threads"])
    try:
        heal_job(assembled["path"], HEAL, tmp_path / "library")
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(out / WEIGHTS)), load_file(str(tmp_path / "library" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a re-run is a cache hit: nothing is healed or written again
    stamp = (out / WEIGHTS).stat().st_mtime_ns
    again = run_heal(assembled["base"], assembled["path"], HEAL.to_dict(), str(out))
    assert again.cached and again.heal == result.heal
    assert (out / WEIGHTS).stat().st_mtime_ns == stamp


def test_heal_stage_refuses_a_wrong_base_or_a_bad_config(
    tiny_lm: str, assembled: dict, tmp_path: Path
) -> None:
    base = assembled["base"]
    other = BaseModel(base.name, "0" * 64, base.layers, base.path)
    with pytest.raises(FFSplitError, match="differ from"):
        run_heal(other, assembled["path"], HEAL.to_dict(), str(tmp_path / "a"))
    with pytest.raises(FFSplitError, match="heal.loss must be one of"):
        bad = {**HEAL.to_dict(), "loss": "mse"}
        run_heal(base, assembled["path"], bad, str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
