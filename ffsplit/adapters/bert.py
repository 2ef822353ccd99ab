"""BERT GELU FFN, split across intermediate.dense and output.dense (the paper's BERT setting)."""

from ffsplit.adapters.base import Adapter


class BertAdapter(Adapter):
    name = "bert"
    architectures = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
    layer_paths = ("encoder.layer", "bert.encoder.layer")
    up = "intermediate.dense"
    down = "output.dense"
    activation = "intermediate.intermediate_act_fn"
    ffn_dataflow = "up_act_down"
