import math

import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.eval.perplexity import perplexity, sequence_nll


def _windows(n: int = 6, length: int = 17, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_perplexity_equals_exp_of_hf_loss(tiny_llama):
    windows = _windows()
    result = perplexity(tiny_llama, windows, batch_size=4)
    with torch.no_grad():
        hf_loss = tiny_llama(input_ids=windows, labels=windows).loss.item()
    assert result.tokens == 6 * 16
    assert result.windows == 6
    assert result.nll_mean == pytest.approx(hf_loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(hf_loss), rel=1e-5)
    assert result.seconds > 0 and result.tokens_per_s > 0


def test_perplexity_is_batch_size_independent_and_deterministic(tiny_llama):
    windows = _windows(n=7)
    values = [perplexity(tiny_llama, windows, batch_size=b).nll_mean for b in (1, 3, 7, 16)]
    assert max(values) - min(values) < 1e-6 * abs(values[0])
    again = perplexity(tiny_llama, windows, batch_size=3).nll_mean
    assert again == values[1]


def test_perplexity_changes_with_the_model(tiny_llama):
    windows = _windows()
    base = perplexity(tiny_llama, windows).perplexity
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight.mul_(25.0)
    assert perplexity(tiny_llama, windows).perplexity != pytest.approx(base, rel=1e-3)


def test_progress_reports_every_batch_and_model_mode_is_restored(tiny_llama):
    calls = []
    tiny_llama.train()
    perplexity(tiny_llama, _windows(n=5), batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert tiny_llama.training


def test_sequence_nll_chunks_like_one_pass():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=generator)
    tokens = torch.randint(0, 50, (3, 11), generator=generator)
    reference = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1), reduction="none"
        )
        .view(3, 10)
        .double()
        .sum(dim=1)
    )
    one_pass = sequence_nll(logits, tokens)
    chunked = sequence_nll(logits, tokens, chunk_elements=3 * 50 * 2)  # 2 positions per chunk
    torch.testing.assert_close(one_pass, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-12, atol=1e-9)


def test_bf16_model_is_scored_in_float32(tiny_llama):
    windows = _windows()
    fp32 = perplexity(tiny_llama, windows).perplexity
    bf16 = perplexity(tiny_llama.to(torch.bfloat16), windows).perplexity
    assert bf16 == pytest.approx(fp32, rel=0.05)


@pytest.mark.parametrize(
    "windows",
    [
        torch.zeros(3, dtype=torch.long),
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(2, 4),
        torch.full((2, 4), 128, dtype=torch.long),
        torch.full((2, 4), -1, dtype=torch.long),
    ],
)
def test_bad_windows_are_user_errors(tiny_llama, windows):
    with pytest.raises(FFSplitError):
        perplexity(tiny_llama, windows)


def test_bad_batch_size_is_a_user_error(tiny_llama):
    with pytest.raises(FFSplitError, match="batch_size"):
        perplexity(tiny_llama, _windows(), batch_size=0)
