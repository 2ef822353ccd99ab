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
from ffsplit.variant import load_variant, read_manifest
from ffsplit.variant.manifest import MANIFEST, WEIGHTS
from tasks.aggregate import aggregate, aggregate_path, stats_file
from tasks.assemble import assemble, variant_path
from tasks.compress import compress_shard, layer_shards, shard_path
from tasks.profile import profile_unit, unit_paths
from tasks.records import BaseModel

PROFILE = ProfileConfig(tokens=512, window=64, batch_size=2)
RECIPE = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3, profile=PROFILE)


@pytest.fixture(scope="module")
def pipeline(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("asm-cache")
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
    shards = [
        compress_shard.run(
            model=base,
            stats_path=str(stats_file(agg)),
            recipe=RECIPE.to_dict(),
            layers=layers,
            out=shard_path(str(root), base, record.key, RECIPE, layers),
        )
        for layers in layer_shards(4, 2)
    ]
    return {
        "base": base,
        "root": root,
        "agg": agg,
        "calibration": record.calibration,
        "shards": shards,
    }


def run_assemble(base: BaseModel, recipe: dict, paths: list[str], out: str, *args: dict):  # noqa: ANN201
    calibration, extra = (list(args) + [None, None])[:2]
    return assemble.run(
        model=base, recipe=recipe, shard_paths=paths, out=out, calibration=calibration, extra=extra
    )


def test_assembled_variant_equals_the_library_job(
    tiny_lm: str, pipeline: dict, tmp_path: Path
) -> None:
    base = pipeline["base"]
    out = Path(variant_path(str(pipeline["root"]), base, [s.key for s in pipeline["shards"]]))
    result = run_assemble(
        base,
        RECIPE.to_dict(),
        [s.path for s in pipeline["shards"]],
        str(out),
        pipeline["calibration"],
        {"pipeline": {"test": True}},
    )
    assert not result.cached and result.label == RECIPE.label
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tasks' thread count: SVD results are then bitwise comparable
    try:
        library = compress_job(
            tiny_lm, RECIPE, tmp_path / "library", stats_path=stats_file(pipeline["agg"])
        )
    finally:
        torch.set_num_threads(threads)
    assert result.ffn_bytes == library["ffn_bytes"]
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
    again = run_assemble(base, RECIPE.to_dict(), [s.path for s in pipeline["shards"]], str(out))
    assert again.cached and again.ffn_reduction == result.ffn_reduction


def test_incomplete_or_foreign_shards_are_refused(
    tiny_lm: str, pipeline: dict, tmp_path: Path
) -> None:
    base = pipeline["base"]
    paths = [s.path for s in pipeline["shards"]]
    with pytest.raises(FFSplitError, match=r"no shard holds layers \[2, 3\]"):
        run_assemble(base, RECIPE.to_dict(), paths[:1], str(tmp_path / "a"))
    with pytest.raises(FFSplitError, match="more than one shard"):
        run_assemble(base, RECIPE.to_dict(), [paths[0], *paths], str(tmp_path / "b"))
    other = RECIPE.replace(ffn_reduction=0.4).to_dict()
    with pytest.raises(FFSplitError, match="another recipe"):
        run_assemble(base, other, paths, str(tmp_path / "c"))
    assert not any((tmp_path / n / MANIFEST).exists() for n in "abc")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert json.loads((Path(paths[0]) / "shard.json").read_text())["format"] == "ffsplit-shard"
