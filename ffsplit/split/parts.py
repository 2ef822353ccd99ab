"""Linear parts that make up a split FFN projection: dense, low-rank, quantized, column-outlier.

Each part computes x @ W.T (+ b) for its own W, counts its storage bytes exactly (16-bit floats,
codes at their bit width), reconstructs W for tests and kernel fusion, and describes its structure
in a small dict (`spec`) so a variant can be rebuilt empty before its weights load (style.md, 6).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import QuantizedTensor, dequantize

FLOAT_BYTES = 2  # float weights are stored and counted at 16 bits, the serving dtype
INDEX_BYTES = 2  # column indices (column-outlier parts) are stored and counted as int16
INDEX_LIMIT = 1 << 15  # the most input columns int16 indices address (every hidden size here)


def to_storage(t: Tensor) -> Tensor:
    """Round to bf16 values (the stored precision) while keeping the compute dtype."""
    return t.to(torch.bfloat16).to(t.dtype if t.is_floating_point() else torch.float32)


class LinearPart(nn.Module):
    """Common interface of every module that stands in for (part of) a linear projection."""

    kind: ClassVar[str]
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """W as [out, in] in the compute dtype."""
        raise NotImplementedError

    def bias_or_none(self) -> Tensor | None:
        return getattr(self, "bias", None)

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def parameter_count(self) -> int:
        """Stored numbers: float elements plus one per quantization code."""
        return sum(t.numel() for t in self.state_dict().values() if t.is_floating_point())

    def check_loaded(self) -> None:
        """Raise FFSplitError when loaded values break what the structure assumes (the
        structure itself is checked from the spec before anything is allocated). Most parts
        assume nothing of their values."""

    def _bias_bytes(self) -> int:
        bias = self.bias_or_none()
        return 0 if bias is None else bias.numel() * FLOAT_BYTES


class DenseLinear(LinearPart):
    """A plain dense block (the heavy part, or an uncompressed light part)."""

    kind = "dense"

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return self.weight.numel() * FLOAT_BYTES + self._bias_bytes()

    def dense_weight(self) -> Tensor:
        return self.weight.detach()

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> DenseLinear:
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        return cls(torch.zeros(spec["out"], spec["in"]), bias)


class LowRankLinear(LinearPart):
    """W ~ a @ b with a [out, r], b [r, in]: two thin matmuls instead of one wide one."""

    kind = "lowrank"

    def __init__(self, a: Tensor, b: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"low-rank factors disagree: a {tuple(a.shape)}, b {tuple(b.shape)}")
        self.out_features, self.rank = a.shape
        self.in_features = b.shape[1]
        self.a = nn.Parameter(a.detach().clone(), requires_grad=False)
        self.b = nn.Parameter(b.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.b), self.a, self.bias)

    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * FLOAT_BYTES + self._bias_bytes()

    def dense_weight(self) -> Tensor:
        return (self.a @ self.b).detach()

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> LowRankLinear:
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        return cls(
            torch.zeros(spec["out"], spec["rank"]), torch.zeros(spec["rank"], spec["in"]), bias
        )


class QuantizedLinear(LinearPart):
    """Group-wise quantized block; groups run along each neuron vector (design.md).

    neuron_major=False: the stored matrix is W [out, in] (up/gate: rows are neurons).
    neuron_major=True: the stored matrix is W.T [in, out] (down: its columns are neurons).
    Codes are dequantized once per device/dtype and cached (CPU reference path; GPU kernels live
    in ffsplit/kernels).
    """

    kind = "quant"

    def __init__(self, quantized: Any, neuron_major: bool, bias: Tensor | None = None) -> None:
        super().__init__()
        rows, cols = quantized.shape
        self.bits = int(quantized.bits)
        self.group_size = int(quantized.group_size)
        self.neuron_major = bool(neuron_major)
        self.shape = (int(rows), int(cols))
        self.out_features, self.in_features = (cols, rows) if neuron_major else (rows, cols)
        self.register_buffer("packed", quantized.packed.detach().clone())
        self.register_buffer("scales", quantized.scales.detach().clone())
        self.register_buffer("zeros", quantized.zeros.detach().clone())
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self._cache: tuple[torch.device, torch.dtype, Tensor] | None = None

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(
            packed=self.packed,
            scales=self.scales,
            zeros=self.zeros,
            bits=self.bits,
            group_size=self.group_size,
            shape=self.shape,
        )

    def _stored_matrix(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self._cache is None or self._cache[0] != device or self._cache[1] != dtype:
            self._cache = (
                device,
                dtype,
                dequantize(self.quantized()).to(device=device, dtype=dtype),
            )
        return self._cache[2]

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        """Follow device moves but keep scales and zeros float16: model.to(bfloat16) must not
        round them (bf16 has fewer mantissa bits), nor change the format the codes assume."""
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        self.scales = scales.to(self.packed.device)
        self.zeros = zeros.to(self.packed.device)
        self._cache = None
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        w = self._stored_matrix(x.device, x.dtype)
        y = x @ w if self.neuron_major else nn.functional.linear(x, w)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return (
            self.packed.numel()
            + (self.scales.numel() + self.zeros.numel()) * FLOAT_BYTES
            + self._bias_bytes()
        )

    def parameter_count(self) -> int:
        return self.shape[0] * self.shape[1] + (0 if self.bias is None else self.bias.numel())

    def dense_weight(self) -> Tensor:
        w = self._stored_matrix(self.scales.device, torch.float32)
        return (w.t() if self.neuron_major else w).detach()

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "neuron_major": self.neuron_major,
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantizedLinear:
        rows, cols = (
            (spec["in"], spec["out"]) if spec["neuron_major"] else (spec["out"], spec["in"])
        )
        q = QuantizedTensor.empty(rows, cols, spec["bits"], spec["group_size"])
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        return cls(q, spec["neuron_major"], bias)


def kept_column_bytes(rows: int, kept: int) -> int:
    """Bytes of ``kept`` 16-bit columns of ``rows`` entries plus their int16 indices."""
    return kept * (rows * FLOAT_BYTES + INDEX_BYTES) if kept else 0


class ColumnOutlierLinear(QuantizedLinear):
    """``y = x @ W.T + b`` where W is a quantized ``[out, in]`` matrix whose ``kept`` input columns
    are replaced by 16-bit values ``kept_weight [out, k]`` (exactly: the kept columns' codes are
    never used). The column-outlier baseline's up/gate part (ffsplit/compress/outliers.py).

    Stored as a quantized part (codes, float16 scales and zeros) plus ``kept`` (int16 column
    indices) and ``kept_weight``; ``nbytes`` counts both at those widths. Not a fused-path part:
    ffsplit.split.fused leaves FFNs holding it on the module path.
    """

    kind = "column_outlier"

    def __init__(
        self,
        quantized: QuantizedTensor,
        kept: Tensor,
        kept_weight: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__(quantized, False, bias)
        where = "ColumnOutlierLinear"
        if self.in_features > INDEX_LIMIT:
            raise FFSplitError(
                f"{where}: {self.in_features} input columns do not fit int16 indices "
                f"(at most {INDEX_LIMIT})"
            )
        if kept.dim() != 1 or tuple(kept_weight.shape) != (self.out_features, kept.numel()):
            raise FFSplitError(
                f"{where}: kept_weight must be [{self.out_features}, {kept.numel()}] for "
                f"{kept.numel()} kept columns, got {tuple(kept_weight.shape)}"
            )
        self.register_buffer("kept", kept.detach().to(torch.int16).clone())
        self.kept_weight = nn.Parameter(kept_weight.detach().clone(), requires_grad=False)
        self.check_loaded()

    def check_loaded(self) -> None:
        values = self.kept.to(torch.long)
        if values.numel() and (
            int(values.min()) < 0
            or int(values.max()) >= self.in_features
            or values.unique().numel() != values.numel()
        ):
            raise FFSplitError(
                f"column_outlier part: kept columns must be distinct indices in "
                f"0..{self.in_features - 1}"
            )

    def _stored_matrix(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self._cache is None or self._cache[0] != device or self._cache[1] != dtype:
            weight = dequantize(self.quantized()).to(device=device, dtype=torch.float32)
            columns = self.kept.to(device=device, dtype=torch.long)
            weight[:, columns] = self.kept_weight.detach().to(device=device, dtype=torch.float32)
            self._cache = (device, dtype, weight.to(dtype))
        return self._cache[2]

    def nbytes(self) -> int:
        return super().nbytes() + kept_column_bytes(self.out_features, self.kept.numel())

    def parameter_count(self) -> int:
        return super().parameter_count() + self.kept_weight.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "kept": self.kept.numel(),
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> ColumnOutlierLinear:  # type: ignore[override]
        kept = spec["kept"]
        if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= spec["in"]:
            raise FFSplitError(f"kept must be an int in 0..{spec['in']}, got {kept!r}")
        q = QuantizedTensor.empty(spec["out"], spec["in"], spec["bits"], spec["group_size"])
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        return cls(q, torch.arange(kept), torch.zeros(spec["out"], kept), bias)


PART_TYPES: dict[str, type[LinearPart]] = {
    cls.kind: cls for cls in (DenseLinear, LowRankLinear, QuantizedLinear, ColumnOutlierLinear)
}


def check_loaded_parts(module: nn.Module, where: str) -> None:
    """Every part under ``module`` accepts the values just loaded into it (LinearPart.check_loaded),
    else one FFSplitError naming the part."""
    for name, part in module.named_modules():
        if isinstance(part, LinearPart):
            try:
                part.check_loaded()
            except FFSplitError as exc:
                raise FFSplitError(f"{where}: {name or 'part'}: {exc}") from None


def build_part(spec: dict[str, Any], where: str = "part") -> LinearPart:
    """An empty part of the right structure, ready for load_state_dict."""
    from ffsplit.split.modules import SPLIT_TYPES

    kind = spec.get("type") if isinstance(spec, dict) else None
    cls = (PART_TYPES.get(kind) or SPLIT_TYPES.get(kind)) if isinstance(kind, str) else None
    if cls is None:
        raise FFSplitError(f"{where}: unknown part type {kind!r}")
    try:
        return cls.empty(spec)  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError, FFSplitError) as exc:
        raise FFSplitError(f"{where}: malformed part spec {spec!r} ({exc})") from None
