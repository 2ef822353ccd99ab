"""Llama-family SwiGLU FFN (Llama, Qwen2, Mistral share the layout: gate/up/down_proj in mlp)."""

from ffsplit.adapters.base import Adapter


class LlamaAdapter(Adapter):
    name = "llama"
    architectures = (
        "LlamaForCausalLM",
        "LlamaModel",
        "Qwen2ForCausalLM",
        "Qwen2Model",
        "MistralForCausalLM",
        "MistralModel",
    )
    layer_paths = ("model.layers", "layers")
    ffn = "mlp"
    up = "mlp.up_proj"
    gate = "mlp.gate_proj"
    down = "mlp.down_proj"
    activation = "mlp.act_fn"
    ffn_dataflow = "gated_mlp"
