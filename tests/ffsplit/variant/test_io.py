"""Variants round-trip exactly, describe themselves, and refuse damaged or foreign files."""

import json

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.recipe import compress_model
from ffsplit.config import ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.profiling import profile_model
from ffsplit.variant import load_variant, read_manifest, save_variant

CONFIG = ProfileConfig(tokens=128, window=16, batch_size=4, hit_top_fraction=0.05)
IDS = torch.randint(0, 150, (8, 16), generator=torch.Generator().manual_seed(0))


def _outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS[:2])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _variant(tmp_path, architecture, recipe):
    model, _ = tiny_model(architecture)
    stats = profile_model(model, IDS, CONFIG)
    report, layers = compress_model(model, stats, recipe)
    adapter = get_adapter(model)
    out = save_variant(
        model,
        None,
        tmp_path / "variant",
        adapter=adapter,
        base_model={"name": "tiny", "weights_sha256": "0" * 64},
        report=report,
        layers=layers,
    )
    return model, out, report


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_round_trip_logits_identical(tmp_path, architecture):
    recipe = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    model, out, report = _variant(tmp_path, architecture, recipe)
    loaded, tokenizer, manifest = load_variant(out)
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert manifest["sizes"]["ffn_bytes"] == report.ffn_bytes
    assert manifest["recipe"]["method"] == "lowrank"
    assert len(manifest["layers"]["0"]["heavy"]) == report.layers[0].heavy


def test_quant_round_trip(tmp_path):
    recipe = Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.6)
    model, out, _ = _variant(tmp_path, "LlamaForCausalLM", recipe)
    loaded, _, _ = load_variant(out)
    assert torch.equal(_outputs(loaded), _outputs(model))


OUTLIER = Recipe(
    method=QuantConfig(group_size=32, allocation="two-level"),
    selection="outlier",
    heavy_ratio=0.05,
    ffn_reduction=0.7,
)


def test_column_outlier_round_trip(tmp_path):
    """The column-outlier baseline's parts (kept bf16 input columns) save and load exactly."""
    model, out, report = _variant(tmp_path, "LlamaForCausalLM", OUTLIER)
    loaded, _, manifest = load_variant(out)
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert manifest["recipe"]["selection"] == "outlier"
    assert manifest["sizes"]["ffn_bytes"] == report.ffn_bytes
    parts = manifest["layers"]["0"]["up"]["parts"]
    assert {p["type"] for p in parts} == {"column_outlier"} and parts[0]["kept"] == 2
    assert len(manifest["layers"]["0"]["heavy"]) == report.layers[0].heavy == 5


def test_column_outlier_specs_and_indices_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    from ffsplit.files import sha256_file

    _, out, _ = _variant(tmp_path, "LlamaForCausalLM", OUTLIER)
    path = out / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    manifest["layers"]["0"]["gate"]["parts"][0]["kept"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(FFSplitError, match="layer 0: gate part keeps 99 columns"):
        load_variant(out)
    # kept columns repeated in the weights (the file re-hashed, so only the check can catch it)
    manifest = json.loads(original)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith(".kept"))
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    manifest["files"]["model.safetensors"] = sha256_file(weights)
    path.write_text(json.dumps(manifest))
    with pytest.raises(FFSplitError, match="kept columns must be distinct indices in 0..31"):
        load_variant(out)


def test_no_pickle_only_safetensors_and_json(tmp_path):
    _, out, _ = _variant(tmp_path, "GPT2LMHeadModel", Recipe(method="prune", ffn_reduction=0.3))
    suffixes = {p.suffix for p in out.iterdir()}
    assert suffixes <= {".json", ".safetensors"}


def test_corrupt_weights_are_refused(tmp_path):
    _, out, _ = _variant(tmp_path, "OPTForCausalLM", Recipe(method="prune", ffn_reduction=0.3))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(FFSplitError, match="does not match the manifest"):
        load_variant(out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "newer"),
        (lambda m: m["files"].update({"../evil": "0"}), "escapes"),
        (lambda m: m.pop("layers"), "lacks layers"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, edit, message):
    _, out, _ = _variant(tmp_path, "OPTForCausalLM", Recipe(method="prune", ffn_reduction=0.3))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(FFSplitError, match=message):
        read_manifest(out)


def test_truncated_manifest_is_refused(tmp_path):
    _, out, _ = _variant(tmp_path, "OPTForCausalLM", Recipe(method="prune", ffn_reduction=0.3))
    path = out / "manifest.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(FFSplitError, match="truncated"):
        load_variant(out)


def test_existing_output_is_not_overwritten(tmp_path):
    model, out, report = _variant(
        tmp_path, "OPTForCausalLM", Recipe(method="prune", ffn_reduction=0.3)
    )
    with pytest.raises(FFSplitError, match="already exists"):
        save_variant(
            model, None, out, adapter=get_adapter(model), base_model={}, report=report, layers={}
        )


def test_quantized_parts_keep_float16_scales_under_dtype_casts(tmp_path):
    recipe = Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.6)
    model, out, _ = _variant(tmp_path, "LlamaForCausalLM", recipe)
    model.to(torch.bfloat16)
    from ffsplit.split.parts import QuantizedLinear

    parts = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert parts and all(p.scales.dtype == torch.float16 for p in parts)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS[:1]).logits).all()


@pytest.mark.parametrize("method", ["quant", "lowrank"])
def test_loading_in_bfloat16_puts_every_part_in_bfloat16(tmp_path, method):
    """load_variant(dtype=bf16), what the GPU path and gpu_speed use: the split parts' float
    parameters (dense heavy rows, factors, biases) follow the model's dtype; stored codes, scales
    and zero points stay as stored. (The parts were built float32 while the model around them was
    bf16: the first GPU run of the flow failed on it, 'mat1 and mat2 must have the same dtype'.)"""
    from ffsplit.split.parts import QuantizedLinear

    # two-level: a bf16 heavy block beside the int light part (the layer allocation keeps none)
    config = QuantConfig(group_size=32, allocation="two-level") if method == "quant" else None
    recipe = Recipe(method=config or method, heavy_ratio=0.1, ffn_reduction=0.6 if config else 0.3)
    _, out, _ = _variant(tmp_path, "LlamaForCausalLM", recipe)
    reference, _, _ = load_variant(out)
    model, _, _ = load_variant(out, dtype=torch.bfloat16)
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    parts = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all(p.scales.dtype == torch.float16 for p in parts) and bool(parts) == bool(config)
    with torch.no_grad():
        got = model(input_ids=IDS[:1]).logits.float()
        want = reference(input_ids=IDS[:1]).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 3e-2


def test_only_listed_files_are_read_and_copied(tmp_path):
    """Issue 16: files planted beside a variant are never read (a tokenizer asking for custom code,
    an unparsable one) and never travel with a copy."""
    from ffsplit.variant.io import copy_variant

    _, out, _ = _variant(tmp_path, "LlamaForCausalLM", Recipe(method="prune", ffn_reduction=0.3))
    listed = set(read_manifest(out)["files"])
    (out / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["x.T", null]}}')
    (out / "tokenizer.json").write_text("not json")
    _, tokenizer, _ = load_variant(out)
    assert tokenizer is None
    copy = copy_variant(out, tmp_path / "copy")
    assert {p.name for p in copy.iterdir()} == listed | {"manifest.json"}


def test_a_variant_without_its_manifest_never_loads_as_a_base_model(tmp_path):
    from ffsplit.models.loading import load_model

    _, out, _ = _variant(tmp_path, "LlamaForCausalLM", Recipe(method="prune", ffn_reduction=0.3))
    (out / "manifest.json").unlink()
    with pytest.raises(FFSplitError, match="without its manifest.json"):
        load_model(out)
    (out / "neurons.safetensors").unlink()
    with pytest.raises(FFSplitError, match=r"holds compressed \(split\) weights but no manifest"):
        load_model(out)


def test_sizes_must_be_what_the_structure_holds(tmp_path):
    _, out, report = _variant(
        tmp_path, "LlamaForCausalLM", Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    )
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    dense = manifest["sizes"]["dense_ffn_bytes"]
    manifest["sizes"].update(ffn_bytes=dense // 10, ffn_reduction=(dense - dense // 10) / dense)
    path.write_text(json.dumps(manifest))
    read_manifest(out)  # consistent with itself
    with pytest.raises(FFSplitError, match=r"sizes\.ffn_bytes \d+ is not what the structure holds"):
        load_variant(out)
