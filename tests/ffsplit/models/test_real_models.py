"""The packaged real models, from the cache (materialised on first use: minutes, maybe a pip install)."""

import json

import pytest
import torch

from ffsplit.data.windows import evaluation_windows
from ffsplit.models.loading import load_model
from ffsplit.models.registry import MODELS

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_the_cache_and_predicts_wikipedia():
    model, tokenizer, ref = load_model("smollm2-135m")
    assert ref.architecture == "LlamaForCausalLM"
    record = json.loads((ref.path / "ffsplit_source.json").read_text())
    assert record["file_sha256"] == MODELS["smollm2-135m"].source_sha256
    assert ref.weights_sha256 == record["weights_sha256"]
    assert sum(p.numel() for p in model.parameters()) == MODELS["smollm2-135m"].params
    windows, corpus = evaluation_windows(tokenizer, "wikipedia", tokens=1024, window=512)
    assert corpus.split == "evaluation" and windows.shape == (2, 512)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss
    # assets.md: about 24 on this text; a broken conversion gives hundreds or more.
    assert 10 < loss.exp().item() < 40


def test_minilm_loads_as_an_encoder():
    model, tokenizer, ref = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert sum(p.numel() for p in model.parameters()) == MODELS["minilm-l6"].params
    batch = tokenizer(["a sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
