"""Assemble stage: shards + base model give the same variant as the library's compress job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ffsplit.config import ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.jobs import compress_job
from ffsplit.models.registry import resolve_model
from ffsplit.variant import load_variant, read_manifest
from ffsplit.variant.manifest import MANIFEST, WEIGHTS
from tasks import cache
from tasks.aggregate import aggregate_job, aggregate_path, stats_file
from tasks.assemble import run_assemble
from tasks.compress import layer_shards, run_shard, shard_plan
from tasks.profile import run_units, unit_plan
from tasks.runtime import run_remote, task_resources

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)
RECIPE = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3, profile=PROFILE)


@pytest.fixture(scope="module")
def pipeline(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("asm-cache")
    sha = resolve_model(tiny_lm).weights_sha256
    plan = unit_plan(sha, PROFILE.to_dict(), 2, str(root))
    run_units(tiny_lm, sha, PROFILE.to_dict(), plan)
    key, agg = aggregate_path(str(root), [p["key"] for p in plan])
    record = run_remote(
        aggregate_job, tiny_lm, sha, [p["path"] for p in plan], agg, resources=task_resources()
    )
    shards = shard_plan(sha, key, RECIPE.to_dict(), layer_shards(4, 2), str(root))
    for p in shards:
        run_shard(tiny_lm, sha, str(stats_file(agg)), RECIPE.to_dict(), p["layers"], p["path"])
    return {
        "sha": sha,
        "root": root,
        "agg": agg,
        "calibration": record["calibration"],
        "shards": shards,
    }


def test_assembled_variant_equals_the_library_job(
    tiny_lm: str, pipeline: dict, tmp_path: Path
) -> None:
    out = cache.variant_dir(
        pipeline["root"], cache.variant_key(pipeline["sha"], [p["key"] for p in pipeline["shards"]])
    )
    result = run_assemble(
        tiny_lm,
        pipeline["sha"],
        RECIPE.to_dict(),
        [p["path"] for p in pipeline["shards"]],
        str(out),
        pipeline["calibration"],
        {"pipeline": {"test": True}},
    )
    assert not result["cached"] and result["label"] == RECIPE.label
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tasks' thread count: SVD results are then bitwise comparable
    try:
        library = compress_job(
            tiny_lm, RECIPE, tmp_path / "library", stats_path=stats_file(pipeline["agg"])
        )
    finally:
        torch.set_num_threads(threads)
    assert result["ffn_bytes"] == library["ffn_bytes"]
    a, b = load_file(str(out / WEIGHTS)), load_file(str(tmp_path / "library" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_manifest(out), read_manifest(tmp_path / "library")
    assert ma["calibration"]["sha256"] == mb["calibration"]["sha256"]
    assert ma["pipeline"] == {"test": True}
    for layer, entry in ma["layers"].items():
        assert entry["heavy"] == mb["layers"][layer]["heavy"]
        assert {k: entry[k] for k in ("up", "gate", "down")} == {
            k: mb["layers"][layer][k] for k in ("up", "gate", "down")
        }
    model, tokenizer, _ = load_variant(out)
    ids = torch.tensor([tokenizer("The heavy hitters hold most of the norm.")["input_ids"]])
    reference, _, _ = load_variant(tmp_path / "library")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    again = run_assemble(
        tiny_lm,
        pipeline["sha"],
        RECIPE.to_dict(),
        [p["path"] for p in pipeline["shards"]],
        str(out),
    )
    assert again["cached"] and again["ffn_reduction"] == result["ffn_reduction"]


def test_incomplete_or_foreign_shards_are_refused(
    tiny_lm: str, pipeline: dict, tmp_path: Path
) -> None:
    paths = [p["path"] for p in pipeline["shards"]]
    with pytest.raises(FFSplitError, match=r"no shard holds layers \[2, 3\]"):
        run_assemble(tiny_lm, pipeline["sha"], RECIPE.to_dict(), paths[:1], str(tmp_path / "a"))
    with pytest.raises(FFSplitError, match="more than one shard"):
        run_assemble(
            tiny_lm, pipeline["sha"], RECIPE.to_dict(), [paths[0], *paths], str(tmp_path / "b")
        )
    other = RECIPE.replace(ffn_reduction=0.4).to_dict()
    with pytest.raises(FFSplitError, match="another recipe"):
        run_assemble(tiny_lm, pipeline["sha"], other, paths, str(tmp_path / "c"))
    assert not any((tmp_path / n / MANIFEST).exists() for n in "abc")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert json.loads((Path(paths[0]) / "shard.json").read_text())["format"] == "ffsplit-shard"
