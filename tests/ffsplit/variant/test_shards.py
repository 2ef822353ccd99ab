"""Shards of compressed layers: save, load and assemble give exactly what compressing in place gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.recipe import compress_layer, compress_model
from ffsplit.config import ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model
from ffsplit.split.apply import swap_ffn
from ffsplit.variant.shards import (
    SHARD_SPEC,
    SHARD_WEIGHTS,
    load_shard,
    read_shard_spec,
    save_shard,
    shard_layers,
)

RECIPES = {
    "lowrank": Recipe(method="lowrank", heavy_ratio=0.25, ffn_reduction=0.4),
    "quant": Recipe(
        method=QuantConfig(group_size=8, allocation="two-level"), heavy_ratio=0.1, ffn_reduction=0.5
    ),
    "prune": Recipe(method="prune", ffn_reduction=0.3),
    "uniform": Recipe(method="lowrank", ffn_reduction=0.3, selection="none"),
    "outlier": Recipe(
        method=QuantConfig(group_size=8, allocation="two-level"),
        selection="outlier",
        heavy_ratio=0.05,
        ffn_reduction=0.7,
    ),
}


def _stats(model: torch.nn.Module):
    windows = torch.randint(0, 160, (4, 16), generator=torch.Generator().manual_seed(0))
    return profile_model(model, windows, ProfileConfig(tokens=64, window=16, batch_size=2))


def _compressed(architecture: str, recipe: Recipe) -> tuple[torch.nn.Module, dict]:
    model, _ = tiny_model(architecture)
    stats = _stats(model)
    adapter = get_adapter(model)
    layers = {}
    for handle in adapter.ffns(model):
        weights = adapter.weights(model, handle)
        layers[handle.layer] = compress_layer(
            weights, stats.layers[handle.layer], recipe, handle.layer
        )
    return model, layers


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    recipe = RECIPES[name]
    _, layers = _compressed("LlamaForCausalLM", recipe)
    out = save_shard(layers, tmp_path / "shard", recipe=recipe.to_dict(), meta={"seconds": 1.5})
    shard = load_shard(out)
    assert shard.recipe == recipe.to_dict()
    assert shard.meta == {"seconds": 1.5}
    assert sorted(shard.layers) == sorted(layers) == shard_layers(out)
    for index, original in layers.items():
        loaded = shard.layers[index]
        assert torch.equal(loaded.heavy_neurons, original.heavy_neurons)
        assert torch.equal(loaded.order, original.order)
        assert loaded.report == original.report
        for a, b in zip(original.modules, loaded.modules, strict=True):
            assert (a is None) == (b is None)
            if a is None:
                continue
            assert a.spec() == b.spec()
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
            assert a.nbytes() == b.nbytes()


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel", "BertModel"])
def test_assembling_shards_equals_compressing_in_place(tmp_path: Path, architecture: str) -> None:
    recipe = RECIPES["lowrank"]
    model, _ = tiny_model(architecture)
    stats = _stats(model) if architecture != "BertModel" else None
    if stats is None:
        recipe = Recipe(
            method=recipe.method.replace(whiten=False), ffn_reduction=0.4, selection="none"
        )
    reference, _ = tiny_model(architecture)
    compress_model(reference, stats, recipe)
    adapter = get_adapter(model)
    handles = adapter.ffns(model)
    paths = []
    for i, group in enumerate([handles[:1], handles[1:]]):
        layers = {
            h.layer: compress_layer(
                adapter.weights(model, h),
                None if stats is None else stats.layers[h.layer],
                recipe,
                h.layer,
            )
            for h in group
        }
        paths.append(save_shard(layers, tmp_path / f"shard-{i}", recipe=recipe.to_dict()))
    for path in paths:
        for index, result in load_shard(path).layers.items():
            swap_ffn(model, adapter, handles[index], result.modules)
    for handle in handles:
        for path in handle.projection_paths:
            a = reference.get_submodule(path).state_dict()
            b = model.get_submodule(path).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = reference(input_ids=ids)
        b = model(input_ids=ids)
    key = "logits" if getattr(a, "logits", None) is not None else "last_hidden_state"
    # Equal weights; outputs may differ in the last bit where a loaded factor's memory layout
    # (contiguous) picks another matmul kernel than the SVD's strided result.
    torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-5, atol=1e-6)


def test_corrupt_and_foreign_shards_are_refused(tmp_path: Path) -> None:
    recipe = RECIPES["quant"]
    _, layers = _compressed("LlamaForCausalLM", recipe)
    out = save_shard(layers, tmp_path / "shard", recipe=recipe.to_dict())
    with pytest.raises(FFSplitError, match="already exists"):
        save_shard(layers, out, recipe=recipe.to_dict())
    weights = out / SHARD_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FFSplitError, match="sha256"):
        load_shard(out)
    spec = json.loads((out / SHARD_SPEC).read_text())
    spec["format_version"] = 99
    (out / SHARD_SPEC).write_text(json.dumps(spec))
    with pytest.raises(FFSplitError, match="format 99"):
        read_shard_spec(out)
    with pytest.raises(FFSplitError, match="not a compressed-layer shard"):
        load_shard(tmp_path)
    with pytest.raises(FFSplitError, match="at least one"):
        save_shard({}, tmp_path / "empty", recipe=recipe.to_dict())


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    recipe = RECIPES["lowrank"]
    _, layers = _compressed("LlamaForCausalLM", recipe)
    with pytest.raises(TypeError):
        save_shard(layers, tmp_path / "shard", recipe={"bad": object()})
    assert list(tmp_path.iterdir()) == []
