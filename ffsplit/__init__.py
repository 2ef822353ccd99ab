"""ffsplit: split transformer FFNs into heavy hitters and a compressed light part (arXiv 2401.04044).

The core library (torch + transformers + safetensors only; no prefect, ray or mlflow; importing it
starts no CUDA). Typical use:

    model, tokenizer, ref = ffsplit.load_model("smollm2-135m")
    stats = ffsplit.profile_model(model, windows)
    report, layers = ffsplit.compress_model(model, stats, ffsplit.Recipe(method="lowrank"))
    model, tokenizer, manifest = ffsplit.load_variant("path/to/variant")
"""

from ffsplit.compress.recipe import compress_layer, compress_model
from ffsplit.config import LowRankConfig, ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.models.loading import load_model
from ffsplit.profiling import load_stats, merge_all, profile_model, save_stats
from ffsplit.variant import load_variant, read_manifest, save_variant

__all__ = [
    "FFSplitError",
    "LowRankConfig",
    "ProfileConfig",
    "QuantConfig",
    "Recipe",
    "compress_layer",
    "compress_model",
    "load_model",
    "load_stats",
    "load_variant",
    "merge_all",
    "profile_model",
    "read_manifest",
    "save_stats",
    "save_variant",
]
