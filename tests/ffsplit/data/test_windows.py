import pytest
import torch

from ffsplit.data.windows import (
    CorpusRef,
    calibration_windows,
    corpus_windows,
    evaluation_windows,
    token_ids_sha256,
    token_windows,
)
from ffsplit.errors import FFSplitError

TEXTS = ["hello world", "second doc", "a third, longer document with more characters"]


@pytest.fixture
def stream(char_vocab):
    """The expected token stream: each document's character ids, joined by a separator text
    (a special token such as "<eos>", or plain characters such as a blank line)."""

    def build(texts: list[str], separator: str) -> list[int]:
        joint = (
            [char_vocab[separator]]
            if separator in char_vocab
            else [char_vocab[c] for c in separator]
        )
        out: list[int] = []
        for i, text in enumerate(texts):
            out.extend(joint if i else [])
            out.extend(char_vocab[c] for c in text)
        return out

    return build


def test_windows_are_the_joined_stream_cut_into_full_windows(char_tokenizer, stream):
    tokenizer = char_tokenizer()
    ids = token_windows(tokenizer, TEXTS, window=8, max_tokens=50)
    expected = stream(TEXTS, "<eos>")[: 6 * 8]
    assert ids.dtype == torch.long
    assert ids.shape == (6, 8)  # 50 // 8 windows, no padding, no partial window
    assert ids.flatten().tolist() == expected


def test_windows_are_deterministic(char_tokenizer):
    a = token_windows(char_tokenizer(), TEXTS, window=5, max_tokens=40)
    b = token_windows(char_tokenizer(), TEXTS, window=5, max_tokens=40)
    assert torch.equal(a, b)


def test_blank_line_separates_documents_without_eos(char_tokenizer, stream):
    ids = token_windows(char_tokenizer(eos=False), TEXTS, window=4, max_tokens=24)
    assert ids.flatten().tolist() == stream(TEXTS, "\n\n")[:24]


def test_windows_are_framed_like_one_text(char_tokenizer, char_vocab, stream):
    tokenizer = char_tokenizer(bos=True, sep=True)
    ids = token_windows(tokenizer, TEXTS, window=6, max_tokens=30)
    assert ids.shape == (5, 6)
    assert (ids[:, 0] == char_vocab["<bos>"]).all()
    assert (ids[:, -1] == char_vocab["<sep>"]).all()
    assert ids[:, 1:-1].flatten().tolist() == stream(TEXTS, "<eos>")[: 5 * 4]
    plain = token_windows(tokenizer, TEXTS, window=6, max_tokens=30, special_tokens=False)
    assert plain.flatten().tolist() == stream(TEXTS, "<eos>")[:30]


def test_too_little_text_says_how_many_tokens_were_found(char_tokenizer, stream):
    total = len(stream(TEXTS, "<eos>"))
    with pytest.raises(FFSplitError, match=f"only {total} tokens"):
        token_windows(char_tokenizer(), TEXTS, window=10, max_tokens=10_000)


def test_bad_sizes_are_errors(char_tokenizer):
    with pytest.raises(FFSplitError, match="smaller than one window"):
        token_windows(char_tokenizer(), TEXTS, window=16, max_tokens=8)
    with pytest.raises(FFSplitError, match="at least 2"):
        token_windows(char_tokenizer(), TEXTS, window=1, max_tokens=8)
    with pytest.raises(FFSplitError, match="no room"):
        token_windows(char_tokenizer(bos=True, sep=True), TEXTS, window=2, max_tokens=8)


def test_token_hash_depends_on_values_and_shape():
    ids = torch.arange(12)
    assert token_ids_sha256(ids.view(3, 4)) == token_ids_sha256(ids.view(3, 4).to(torch.int32))
    assert token_ids_sha256(ids.view(3, 4)) != token_ids_sha256(ids.view(4, 3))
    assert token_ids_sha256(ids.view(3, 4)) != token_ids_sha256((ids + 1).view(3, 4))


def test_corpus_ref_round_trips_and_validates():
    ref = CorpusRef("news", "calibration", 64, 16, 0, "ab" * 32)
    assert CorpusRef.from_dict(ref.to_dict()) == ref
    with pytest.raises(FFSplitError, match="unknown keys"):
        CorpusRef.from_dict({**ref.to_dict(), "extra": 1})
    with pytest.raises(FFSplitError, match="missing keys"):
        CorpusRef.from_dict({k: v for k, v in ref.to_dict().items() if k != "seed"})
    with pytest.raises(FFSplitError, match="multiple of window"):
        CorpusRef("news", "calibration", 65, 16, 0, "ab" * 32)
    with pytest.raises(FFSplitError, match="unknown split"):
        CorpusRef("news", "train", 64, 16, 0, "ab" * 32)


def test_local_file_windows_record_the_file(tmp_path, char_tokenizer):
    path = tmp_path / "text.txt"
    path.write_text("The same text, " * 20, encoding="utf-8")
    ids, ref = corpus_windows(char_tokenizer(), path, "all", tokens=100, window=32)
    assert ids.shape == (3, 32)
    assert ref.corpus == str(path.resolve())
    assert ref.tokens == 96 and ref.window == 32 and ref.split == "all"
    assert ref.sha256 == token_ids_sha256(ids)


def test_calibration_and_evaluation_windows_differ(char_tokenizer):
    tokenizer = char_tokenizer()
    calibration, cref = calibration_windows(tokenizer, "news", tokens=4096, window=256)
    evaluation, eref = evaluation_windows(tokenizer, "news", tokens=4096, window=256)
    assert calibration.shape == evaluation.shape == (16, 256)
    assert (cref.split, eref.split) == ("calibration", "evaluation")
    assert cref.sha256 != eref.sha256
    again, ref_again = calibration_windows(tokenizer, "news", tokens=4096, window=256)
    assert torch.equal(calibration, again) and ref_again == cref
