"""MPNet GELU FFN (all-mpnet-base-v2), split across intermediate.dense and output.dense like BERT."""

from ffsplit.adapters.base import Adapter


class MPNetAdapter(Adapter):
    name = "mpnet"
    architectures = ("MPNetModel", "MPNetForMaskedLM", "MPNetForSequenceClassification")
    layer_paths = ("encoder.layer", "mpnet.encoder.layer")
    up = "intermediate.dense"
    down = "output.dense"
    activation = "intermediate.intermediate_act_fn"
    ffn_dataflow = "up_act_down"
