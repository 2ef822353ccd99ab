"""GPT-NeoX (Pythia) GELU FFN: dense_h_to_4h / dense_4h_to_h with biases."""

from ffsplit.adapters.base import Adapter


class GPTNeoXAdapter(Adapter):
    name = "gpt_neox"
    architectures = ("GPTNeoXForCausalLM", "GPTNeoXModel")
    layer_paths = ("gpt_neox.layers", "layers")
    ffn = "mlp"
    up = "mlp.dense_h_to_4h"
    down = "mlp.dense_4h_to_h"
    activation = "mlp.act"
    ffn_dataflow = "up_act_down"
