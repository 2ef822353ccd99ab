"""Column-outlier keeping: the baseline that asks whether whole neurons are the right thing to keep.

OWQ (Lee et al., arXiv 2306.02272) keeps the few weight columns whose *input* channels carry the
most activation energy (Gram diagonal) in 16 bits and quantizes the rest; SqueezeLLM's
dense-and-sparse split (Kim et al., arXiv 2306.07629) is the same idea per element. FFSplit keeps
whole *neurons* chosen by output score. At equal bytes the baseline keeps the same number of
16-bit weights per matrix: ``k = ceil(rho * inputs)`` input columns, i.e. for up/gate ``rho * d``
columns of the FFN input, and for down ``rho * m`` neurons chosen by activation energy ``S2_j``
(down's inputs are the neurons, so there the baseline keeps neuron vectors too, picked by
``diag(gram_hidden)`` instead of the score ``sqrt(S2_j) ||v_j||``).

Storage of a column-outlier matrix: the quantized matrix in the project's format (codes for the
kept columns are stored but overridden), plus the kept columns in bf16 and their indices as int16.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.errors import FFSplitError
from ffsplit.split.parts import FLOAT_BYTES, LinearPart
from ffsplit.split.qformat import QuantizedTensor, dequantize
from ffsplit.split.qformat import nbytes as quantized_bytes

INDEX_BYTES = 2  # int16 column indices: every hidden size here is below 32768


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


def kept_column_bytes(rows: int, kept: int) -> int:
    """Bytes of ``kept`` 16-bit columns of ``rows`` entries plus their int16 indices."""
    return kept * (rows * FLOAT_BYTES + INDEX_BYTES) if kept else 0


class ColumnOutlierLinear(LinearPart):
    """``y = x @ W.T + b`` where W is a quantized ``[out, in]`` matrix whose ``kept`` input columns
    are replaced by 16-bit values ``kept_weight [out, k]`` (exactly: the kept columns' codes are
    never used)."""

    kind = "column_outlier"

    def __init__(
        self,
        quantized: QuantizedTensor,
        kept: Tensor,
        kept_weight: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        if tuple(kept_weight.shape) != (self.out_features, kept.numel()):
            raise FFSplitError(
                f"ColumnOutlierLinear: kept_weight must be [{self.out_features}, {kept.numel()}], "
                f"got {tuple(kept_weight.shape)}"
            )
        self.quantized = quantized
        self.register_buffer("kept", kept.detach().to(torch.long).clone())
        self.kept_weight = nn.Parameter(kept_weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self._cache: tuple[torch.device, torch.dtype, Tensor] | None = None

    def dense_weight(self) -> Tensor:
        weight = dequantize(self.quantized).to(self.kept_weight.device)
        weight[:, self.kept] = self.kept_weight.to(torch.float32)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        if self._cache is None or self._cache[:2] != (x.device, x.dtype):
            self._cache = (x.device, x.dtype, self.dense_weight().to(x.device, x.dtype))
        return nn.functional.linear(x, self._cache[2], self.bias)

    def nbytes(self) -> int:
        return (
            quantized_bytes(self.quantized)
            + kept_column_bytes(self.out_features, self.kept.numel())
            + self._bias_bytes()
        )

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "bits": self.quantized.bits,
            "group_size": self.quantized.group_size,
            "kept": self.kept.numel(),
            "bias": self.bias is not None,
        }
