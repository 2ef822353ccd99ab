"""MPNet adapter (all-mpnet-base-v2): the FFN is intermediate.dense -> GELU -> output.dense, and
the canonical FFN computes exactly what the layer's own modules compute."""

import torch

from ffsplit.adapters import adapter_by_name, dense_ffn, get_adapter
from ffsplit.adapters.mpnet import MPNetAdapter
from ffsplit.models.tiny import tiny_model


def test_mpnet_models_get_the_mpnet_adapter():
    model, _ = tiny_model("MPNetModel")
    adapter = get_adapter(model)
    assert isinstance(adapter, MPNetAdapter) and adapter_by_name("mpnet").name == "mpnet"
    handles = adapter.ffns(model)
    assert [h.layer for h in handles] == list(range(model.config.num_hidden_layers))
    assert handles[0].up_path == "encoder.layer.0.intermediate.dense"
    assert handles[0].down_path == "encoder.layer.0.output.dense" and not handles[0].gated


def test_canonical_ffn_equals_the_layers_own_modules():
    model, _ = tiny_model("MPNetModel", seed=4)
    adapter = get_adapter(model)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for handle in adapter.ffns(model):
        layer = model.encoder.layer[handle.layer]
        with torch.no_grad():
            expected = layer.output.dense(layer.intermediate(x))  # dense(GELU(dense(x)))
        weights = adapter.weights(model, handle)
        assert weights.up.shape == (model.config.intermediate_size, model.config.hidden_size)
        assert weights.up_bias is not None and weights.down_bias is not None
        torch.testing.assert_close(dense_ffn(weights, handle.activation, x), expected)
