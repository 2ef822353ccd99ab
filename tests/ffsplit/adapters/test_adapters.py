"""Every adapter finds every FFN and reads it in canonical form; the dense reference matches."""

import pytest
import torch

from ffsplit.adapters import dense_ffn, get_adapter, supported_architectures
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_adapter_reads_canonical_ffn(architecture):
    model, _ = tiny_model(architecture)
    adapter = get_adapter(model)
    handles = adapter.ffns(model)
    assert len(handles) == model.config.num_hidden_layers
    for handle in handles:
        w = adapter.weights(model, handle)
        m, d = w.up.shape
        assert w.down.shape == (d, m)
        assert (w.gate is not None) == handle.gated
        # The canonical FFN reproduces the container's own output where the container is an MLP.
        container = model.get_submodule(handle.path)
        if handle.path.endswith("mlp"):
            x = torch.randn(3, d)
            torch.testing.assert_close(dense_ffn(w, handle.activation, x), container(x))


def test_unsupported_architecture_names_it_and_lists_supported():
    model, _ = tiny_model("LlamaForCausalLM")
    model.config.architectures = ["MambaForCausalLM"]
    with pytest.raises(FFSplitError) as err:
        get_adapter(model)
    message = str(err.value)
    assert "MambaForCausalLM" in message
    for name in ("LlamaForCausalLM", "OPTForCausalLM", "BertModel"):
        assert name in message
    assert "GPT2LMHeadModel" in supported_architectures()
