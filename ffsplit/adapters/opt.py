"""OPT ReLU FFN: fc1/fc2 with biases sit directly in the decoder layer."""

from ffsplit.adapters.base import Adapter


class OPTAdapter(Adapter):
    name = "opt"
    architectures = ("OPTForCausalLM", "OPTModel")
    layer_paths = ("model.decoder.layers", "decoder.layers")
    up = "fc1"
    down = "fc2"
    activation = "activation_fn"
    ffn_dataflow = "up_act_down"
