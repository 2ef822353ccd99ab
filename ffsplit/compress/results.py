"""What compressing FFNs produces: per-layer split modules with their neuron order and report,
and the whole model's report. Shared by the compressor, shards, assembly and variant folders."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from ffsplit.split.modules import SplitInProjection, SplitOutProjection

SplitModules = tuple[SplitOutProjection, SplitOutProjection | None, SplitInProjection]


@dataclass
class LayerReport:
    """What was done to one FFN, in numbers (goes into the manifest)."""

    layer: int
    neurons: int
    heavy: int
    dense_bytes: int
    bytes: int
    rank: int | None = None
    bits: dict[int, int] | None = None  # light neurons per bit width (16 = dense)
    kept: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class CompressedLayer:
    layer: int
    modules: SplitModules
    heavy_neurons: Tensor  # original neuron indices of the heavy set
    order: Tensor  # original neuron index of each position in the split FFN (pruned ones absent)
    report: LayerReport


@dataclass
class CompressionReport:
    recipe: dict[str, Any]
    layers: list[LayerReport]
    dense_ffn_bytes: int
    ffn_bytes: int
    seconds: float

    @classmethod
    def of(
        cls, recipe: dict[str, Any], layers: list[LayerReport], seconds: float
    ) -> CompressionReport:
        """The whole model's report from its layers' reports (bytes summed exactly)."""
        return cls(
            recipe=recipe,
            layers=layers,
            dense_ffn_bytes=sum(r.dense_bytes for r in layers),
            ffn_bytes=sum(r.bytes for r in layers),
            seconds=seconds,
        )

    @property
    def ffn_reduction(self) -> float:
        """Achieved FFN reduction by bytes, exact (never rounded to the target)."""
        return 1.0 - self.ffn_bytes / self.dense_ffn_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "dense_ffn_bytes": self.dense_ffn_bytes,
            "ffn_bytes": self.ffn_bytes,
            "ffn_reduction": self.ffn_reduction,
            "seconds": self.seconds,
            "layers": [asdict(r) for r in self.layers],
        }
