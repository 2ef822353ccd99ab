import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model


def _output(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_listed_architecture_is_covered():
    assert set(TINY_ARCHITECTURES) == {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Gemma3ForCausalLM",
        "OPTForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "BertModel",
        "MPNetModel",
    }


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_tiny_model_builds_runs_and_is_seeded(architecture):
    before = torch.random.get_rng_state()
    model, tokenizer = tiny_model(architecture, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert tokenizer is None and not model.training
    assert type(model).__name__ == architecture
    assert model.config.architectures == [architecture]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 100_000
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    out = _output(model, ids)
    causal = architecture.endswith(("ForCausalLM", "LMHeadModel"))
    width = 160 if causal else model.config.hidden_size
    assert out.shape == (2, 12, width) and torch.isfinite(out).all()
    assert torch.equal(out, _output(tiny_model(architecture, seed=0)[0], ids))
    assert not torch.equal(out, _output(tiny_model(architecture, seed=1)[0], ids))


def test_unknown_architecture_is_an_error():
    with pytest.raises(FFSplitError, match="no tiny model for architecture 'T5Model'"):
        tiny_model("T5Model")
