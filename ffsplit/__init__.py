"""ffsplit: split transformer FFNs into heavy hitters and a compressed light part (arXiv 2401.04044).

The core library (torch + transformers + safetensors only; no prefect, ray or mlflow; importing it
starts no CUDA). Typical use:

    model, tokenizer, ref = ffsplit.load_model("smollm2-135m")
    stats = ffsplit.profile_model(model, windows)
    report, layers = ffsplit.compress_model(model, stats, ffsplit.Recipe(method="lowrank"))
    model, tokenizer, manifest = ffsplit.load_variant("path/to/variant")
"""

import importlib
from typing import Any

from ffsplit.errors import FFSplitError

# Public names and the modules that hold them, imported on first use: `import ffsplit` (and every
# `python -m flows.stack ...`, which imports it through the package tree) then costs no torch or
# transformers import.
_EXPORTS = {
    "compress_layer": "ffsplit.compress.recipe",
    "compress_model": "ffsplit.compress.recipe",
    "LowRankConfig": "ffsplit.config",
    "ProfileConfig": "ffsplit.config",
    "QuantConfig": "ffsplit.config",
    "Recipe": "ffsplit.config",
    "load_model": "ffsplit.models.loading",
    "load_stats": "ffsplit.profiling",
    "merge_all": "ffsplit.profiling",
    "profile_model": "ffsplit.profiling",
    "save_stats": "ffsplit.profiling",
    "load_variant": "ffsplit.variant",
    "read_manifest": "ffsplit.variant",
    "save_variant": "ffsplit.variant",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ffsplit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = ["FFSplitError", *sorted(_EXPORTS)]
