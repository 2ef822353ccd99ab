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
from ffsplit.models.registry import resolve_model
from ffsplit.variant import read_manifest
from ffsplit.variant.manifest import WEIGHTS
from tasks import cache
from tasks.aggregate import aggregate_job, aggregate_path, stats_file
from tasks.assemble import run_assemble
from tasks.compress import layer_shards, run_shard, shard_plan
from tasks.heal import run_heal, unhealed
from tasks.profile import run_units, unit_plan
from tasks.runtime import run_remote, task_resources

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)
HEAL = HealConfig(steps=6, loss="local", lr=1e-3, tokens=512, window=64, batch_size=2)
RECIPE = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.4, profile=PROFILE, heal=HEAL)


@pytest.fixture(scope="module")
def assembled(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The unhealed variant of RECIPE, made by the pipeline's stages (profile .. assemble)."""
    root = tmp_path_factory.mktemp("heal-cache")
    sha = resolve_model(tiny_lm).weights_sha256
    plan = unit_plan(sha, PROFILE.to_dict(), 2, str(root))
    run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    key, agg = aggregate_path(str(root), [p["key"] for p in plan])
    record = run_remote(
        aggregate_job, tiny_lm, sha, [p["path"] for p in plan], agg, resources=task_resources()
    )
    compression = unhealed(RECIPE).to_dict()
    shards = shard_plan(sha, key, compression, layer_shards(4, 2), str(root))
    for p in shards:
        run_shard(tiny_lm, sha, str(stats_file(agg)), compression, p["layers"], p["path"])
    variant_key = cache.variant_key(sha, [p["key"] for p in shards])
    out = cache.variant_dir(root, variant_key)
    run_assemble(
        tiny_lm, sha, compression, [p["path"] for p in shards], str(out), record["calibration"]
    )
    return {"sha": sha, "root": root, "key": variant_key, "path": str(out)}


def test_unhealed_recipe_is_the_compression_alone() -> None:
    plain = unhealed(RECIPE)
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
    result = run_heal(tiny_lm, assembled["sha"], assembled["path"], HEAL.to_dict(), str(out))
    assert not result["cached"] and result["label"] == RECIPE.label
    assert result["heal"]["steps"] == 6 and result["heal"]["after"] < result["heal"]["before"]
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
    again = run_heal(tiny_lm, assembled["sha"], assembled["path"], HEAL.to_dict(), str(out))
    assert again["cached"] and again["heal"] == result["heal"]
    assert (out / WEIGHTS).stat().st_mtime_ns == stamp


def test_heal_stage_refuses_a_wrong_base_or_a_bad_config(
    tiny_lm: str, assembled: dict, tmp_path: Path
) -> None:
    with pytest.raises(FFSplitError, match="differ from"):
        run_heal(tiny_lm, "0" * 64, assembled["path"], HEAL.to_dict(), str(tmp_path / "a"))
    with pytest.raises(FFSplitError, match="heal.loss must be one of"):
        run_heal(
            tiny_lm,
            assembled["sha"],
            assembled["path"],
            {**HEAL.to_dict(), "loss": "mse"},
            str(tmp_path / "b"),
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
