"""Split projections: drop-in replacements for an FFN's linears (never a rewritten forward).

Neurons are permuted so the heavy set comes first; each projection is a list of parts over
consecutive neuron ranges. Up/gate concatenate their parts' outputs; down sums its parts over the
matching slices of the hidden activation, plus the output bias (which goes with the heavy part).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.split.parts import FLOAT_BYTES, LinearPart, build_part


class SplitOutProjection(LinearPart):
    """Replaces up/gate: neuron ranges side by side, y = cat([part(x) for part in parts])."""

    kind = "split_out"

    def __init__(self, parts: list[LinearPart]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a split projection needs at least one part")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.sizes = [p.out_features for p in parts]

    def forward(self, x: Tensor) -> Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def parameter_count(self) -> int:
        return sum(p.parameter_count() for p in self.parts)

    def dense_weight(self) -> Tensor:
        return torch.cat([p.dense_weight() for p in self.parts], dim=0)

    def bias_or_none(self) -> Tensor | None:
        biases = [p.bias_or_none() for p in self.parts]
        if all(b is None for b in biases):
            return None
        return torch.cat(
            [
                b if b is not None else torch.zeros(p.out_features)
                for b, p in zip(biases, self.parts, strict=True)
            ]
        )

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "parts": [p.spec() for p in self.parts]}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> SplitOutProjection:
        return cls([build_part(s) for s in spec["parts"]])


class SplitInProjection(LinearPart):
    """Replaces down: y = sum_i part_i(h[..., o_i:o_i+n_i]) + bias."""

    kind = "split_in"

    def __init__(self, parts: list[LinearPart], bias: Tensor | None = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a split projection needs at least one part")
        self.parts = nn.ModuleList(parts)
        self.sizes = [p.in_features for p in parts]
        self.in_features = sum(self.sizes)
        self.out_features = parts[0].out_features
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def forward(self, h: Tensor) -> Tensor:
        if len(self.parts) == 1:
            y = self.parts[0](h)
        else:
            y = None
            for part, chunk in zip(self.parts, torch.split(h, self.sizes, dim=-1), strict=True):
                out = part(chunk)
                y = out if y is None else y + out
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts) + self._bias_bytes()

    def parameter_count(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel()
        return sum(p.parameter_count() for p in self.parts) + bias

    def dense_weight(self) -> Tensor:
        return torch.cat([p.dense_weight() for p in self.parts], dim=1)

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "parts": [p.spec() for p in self.parts],
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> SplitInProjection:
        parts = [build_part(s) for s in spec["parts"]]
        bias = torch.zeros(parts[0].out_features) if spec["bias"] else None
        return cls(parts, bias)


SPLIT_TYPES: dict[str, type[LinearPart]] = {
    SplitOutProjection.kind: SplitOutProjection,
    SplitInProjection.kind: SplitInProjection,
}

__all__ = ["FLOAT_BYTES", "SPLIT_TYPES", "SplitInProjection", "SplitOutProjection"]
