"""Gemma 3 GeGLU FFN (gelu_pytorch_tanh gate); text-only causal LM layout."""

from ffsplit.adapters.base import Adapter


class Gemma3Adapter(Adapter):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM", "Gemma3TextModel")
    layer_paths = ("model.layers", "layers")
    ffn = "mlp"
    up = "mlp.up_proj"
    gate = "mlp.gate_proj"
    down = "mlp.down_proj"
    activation = "mlp.act_fn"
    ffn_dataflow = "gated_mlp"
