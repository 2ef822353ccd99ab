"""GPT-2 GELU FFN: Conv1D projections store weights transposed ([in, out])."""

from ffsplit.adapters.base import Adapter


class GPT2Adapter(Adapter):
    name = "gpt2"
    architectures = ("GPT2LMHeadModel", "GPT2Model")
    layer_paths = ("transformer.h", "h")
    ffn = "mlp"
    up = "mlp.c_fc"
    down = "mlp.c_proj"
    activation = "mlp.act"
    ffn_dataflow = "up_act_down"
    transposed = True
