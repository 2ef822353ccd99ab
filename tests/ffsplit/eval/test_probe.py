import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from ffsplit.errors import FFSplitError
from ffsplit.eval.probe import embed, linear_probe, probe_accuracy

FILLER = [f"w{i}" for i in range(30)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, "alpha", "beta"]


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


@pytest.fixture
def tokenizer():
    return BertTokenizer(vocab={word: index for index, word in enumerate(VOCAB)})


def _task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Random filler sentences; class 1 texts contain 'beta', class 0 texts contain 'alpha'."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), "beta" if label else "alpha")
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_embed_mean_pools_real_tokens_only(tiny_bert, tokenizer):
    texts = ["w1 alpha w2", "w3 w4 w5 w6 w7 w8 beta w9 w10", "w2"]
    pooled = embed(tiny_bert, tokenizer, texts, batch_size=2)
    assert pooled.shape == (3, 32) and pooled.dtype == torch.float32
    for row, text in enumerate(texts):  # alone in its batch: no padding at all
        encoded = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            alone = tiny_bert(**encoded).last_hidden_state.mean(dim=1)[0]
        torch.testing.assert_close(pooled[row], alone, rtol=1e-5, atol=1e-5)


def test_embed_truncates_to_max_length(tiny_bert, tokenizer):
    long_text = " ".join(FILLER * 4)
    short = embed(tiny_bert, tokenizer, [long_text], max_length=8)
    encoded = tokenizer([long_text], truncation=True, max_length=8, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 8
    with torch.no_grad():
        expected = tiny_bert(**encoded).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(short, expected, rtol=1e-5, atol=1e-5)


def test_probe_separates_a_synthetic_task_and_is_deterministic(tiny_bert, tokenizer):
    train_texts, train_labels = _task(160, seed=1)
    test_texts, test_labels = _task(80, seed=2)
    first = probe_accuracy(tiny_bert, tokenizer, train_texts, train_labels, test_texts, test_labels)
    assert first.accuracy >= 0.9  # chance is about 0.5
    assert (first.n_train, first.n_test, first.n_classes) == (160, 80, 2)
    assert first.converged and first.seconds > 0
    second = probe_accuracy(
        tiny_bert, tokenizer, train_texts, train_labels, test_texts, test_labels
    )
    assert second.accuracy == first.accuracy


def test_probe_is_at_chance_on_shuffled_labels():
    generator = np.random.default_rng(0)
    features = generator.normal(size=(400, 16))
    labels = generator.integers(0, 2, size=400)
    result = linear_probe(features[:300], labels[:300], features[300:], labels[300:])
    assert 0.3 < result.accuracy < 0.7


def test_linear_probe_accepts_tensors_and_string_labels():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    index = torch.randint(0, 3, (300,), generator=generator)
    features = centers[index] + 0.5 * torch.randn(300, 2, generator=generator)
    names = np.array(["neg", "neu", "pos"])[index.numpy()]
    result = linear_probe(features[:200], list(names[:200]), features[200:], list(names[200:]))
    assert result.n_classes == 3 and result.accuracy > 0.95


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros((4, 3)), [0, 0, 0, 0], np.zeros((2, 3)), [0, 1]),  # one class
        (np.zeros((4, 3)), [0, 1, 0, 1], np.zeros((2, 2)), [0, 1]),  # width mismatch
        (np.zeros((4, 3)), [0, 1, 0], np.zeros((2, 3)), [0, 1]),  # label count mismatch
        (np.full((4, 3), np.nan), [0, 1, 0, 1], np.zeros((2, 3)), [0, 1]),  # NaN features
    ],
)
def test_linear_probe_bad_input_is_a_user_error(args):
    with pytest.raises(FFSplitError):
        linear_probe(*args)


def test_embed_bad_input_is_a_user_error(tiny_bert, tokenizer):
    with pytest.raises(FFSplitError, match="no texts"):
        embed(tiny_bert, tokenizer, [])
    tokenizer.pad_token = None
    with pytest.raises(FFSplitError, match="pad token"):
        embed(tiny_bert, tokenizer, ["w1"])
