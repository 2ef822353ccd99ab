"""Split FFNs: heavy/light parts swapped in place of an FFN's projections."""

from ffsplit.split.apply import (
    BlockParts,
    build_split,
    dense_block,
    ffn_modules,
    restrict,
    swap_ffn,
)
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import (
    ColumnOutlierLinear,
    DenseLinear,
    LinearPart,
    LowRankLinear,
    QuantizedLinear,
    build_part,
)

__all__ = [
    "BlockParts",
    "ColumnOutlierLinear",
    "DenseLinear",
    "LinearPart",
    "LowRankLinear",
    "QuantizedLinear",
    "SplitInProjection",
    "SplitOutProjection",
    "build_part",
    "build_split",
    "dense_block",
    "ffn_modules",
    "restrict",
    "swap_ffn",
]
