"""Column-outlier keeping: the baseline that asks whether whole neurons are the right thing to keep.

OWQ (Lee et al., arXiv 2306.02272) keeps the few weight columns whose *input* channels carry the
most activation energy (Gram diagonal) in 16 bits and quantizes the rest; SqueezeLLM's
dense-and-sparse split (Kim et al., arXiv 2306.07629) is the same idea per element. FFSplit keeps
whole *neurons* chosen by output score. At equal bytes the baseline keeps the same number of
16-bit weights per matrix: ``k = ceil(rho * inputs)`` input columns, i.e. for up/gate ``rho * d``
columns of the FFN input, and for down ``rho * m`` neurons chosen by activation energy ``S2_j``
(down's inputs are the neurons, so there the baseline keeps neuron vectors too, picked by
``diag(gram_hidden)`` instead of the score ``sqrt(S2_j) ||v_j||``).

Storage of a column-outlier matrix (ffsplit.split.parts.ColumnOutlierLinear, re-exported here): the
quantized matrix in the project's format (codes for the kept columns are stored but overridden),
plus the kept columns in bf16 and their indices as int16. The part lives with the other split parts
so that variants and shards rebuild it from its spec; the recipe reaches this baseline by
selection "outlier" (ffsplit.config.Recipe, ffsplit.compress.recipe).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.split.parts import INDEX_BYTES, ColumnOutlierLinear, kept_column_bytes

__all__ = [
    "INDEX_BYTES",
    "ColumnOutlierLinear",
    "kept_column_bytes",
    "outlier_columns",
    "outlier_count",
]


def outlier_count(inputs: int, ratio: float) -> int:
    """``ceil(ratio * inputs)`` kept columns, as selection.heavy_count counts heavy neurons."""
    if not 0 <= ratio < 1:
        raise FFSplitError(f"outlier_count: ratio must be in [0, 1), got {ratio}")
    return math.ceil(ratio * inputs - 1e-9)


def outlier_columns(gram: Tensor, count: int) -> Tensor:
    """The ``count`` inputs with the largest activation energy ``diag(gram)``, largest first
    (ties by lower index)."""
    energy = gram.detach().diagonal().to(torch.float64).cpu()
    if not 0 <= count <= energy.numel():
        raise FFSplitError(f"outlier_columns: count {count} not in 0..{energy.numel()}")
    return torch.sort(-energy, stable=True).indices[:count]
