"""Low-bit FFN kernels a user could pick instead of ffsplit's: GemLite and torch's int4 tinygemm.

Measured side by side with ffsplit's kernels in bench/ffn.py --quant (same shapes, same CUDA-graph
timing, random codes: valid for speed). Two layouts each:

- uniform: every projection one library GEMM (no split);
- split: heavy neurons dense through cuBLAS, light neurons one library GEMM per projection (the
  best a user can do with a stock low-bit kernel and FFSplit's structure: two GEMMs per matrix).

GemLite 0.6.0.post2 (pure Python over Triton; scripts/fetch_gemlite.sh puts it in .gemlite/src):
its A16Wn layers with group scales and zeros, its own kernel choice per batch size (GEMV_REVSPLITK
at 1 token, GEMM_SPLITK at 16, GEMM above), H100 cached configs loaded (the H200 has none), the
autotune setting of ``GEMLITE_AUTOTUNE`` (``default``: its fixed configs; its ``max`` autotune did
not finish in 9 minutes on these shapes, issue 13). tinygemm: ``torch.ops.aten._weight_int4pack_mm``
(int4, groups 32..256, bf16), weights packed by ``_convert_weight_to_int4pack``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import _ACT, MLP, FFNSpec, QuantRecipe, _randn
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import DenseLinear

GEMLITE_SRC = Path(__file__).resolve().parents[1] / ".gemlite" / "src"
PAD = 256  # light neuron counts padded to this for the libraries (K multiples of their tiles)


def gemlite_module() -> Any | None:
    """GemLite imported from .gemlite/src (None if absent), its H100 configs loaded, autotune set."""
    if str(GEMLITE_SRC) not in sys.path and GEMLITE_SRC.is_dir():
        sys.path.insert(0, str(GEMLITE_SRC))
    try:
        import gemlite
    except ImportError:
        return None
    gemlite.set_autotune(os.environ.get("GEMLITE_AUTOTUNE", "default"))
    configs = Path(gemlite.__file__).parent / "configs" / "h100.json"
    gemlite.load_config(str(configs))
    return gemlite


class LibLinear(nn.Module):
    """y = x @ W^T through a library kernel; in/out features as the split projections expect."""

    def __init__(self, fn: Any, in_features: int, out_features: int, keep: list[Any]) -> None:
        super().__init__()
        self.fn, self.in_features, self.out_features = fn, in_features, out_features
        self._keep = keep  # the library's own modules/tensors
        self.nbytes_ = sum(
            t.numel() * t.element_size()
            for k in keep
            for t in ([k] if isinstance(k, Tensor) else [*k.parameters(), *k.buffers()])
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        return self.fn(x.reshape(-1, shape[-1])).view(*shape[:-1], self.out_features)


def gemlite_linear(rows: int, cols: int, bits: int, group: int, device: torch.device) -> LibLinear:
    gemlite = gemlite_module()
    from gemlite.core import DType, GemLiteLinearTriton

    layer = GemLiteLinearTriton(
        W_nbits=bits,
        group_size=group,
        in_features=cols,
        out_features=rows,
        input_dtype=DType.BF16,
        output_dtype=DType.BF16,
    )
    codes = torch.randint(0, 1 << bits, (rows, cols), device=device, dtype=torch.uint8)
    scales = torch.full((rows, cols // group), 2.0 / (cols**0.5 * (1 << bits)), device=device)
    zeros = torch.full((rows, cols // group), float(1 << (bits - 1)), device=device)
    layer.pack(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16), bias=None)
    assert gemlite is not None
    return LibLinear(layer, cols, rows, [layer])


def tinygemm_linear(rows: int, cols: int, group: int, device: torch.device) -> LibLinear:
    codes = torch.randint(0, 16, (rows, cols), device=device, dtype=torch.int32)
    as_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes, 8)
    scale = 2.0 / (cols**0.5 * 16)
    sz = torch.empty(cols // group, rows, 2, device=device, dtype=torch.bfloat16)
    sz[..., 0] = scale
    sz[..., 1] = 0.0

    def mm(x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, group, sz)

    return LibLinear(mm, cols, rows, [packed, sz])


def lib_linear(
    kernel: str, rows: int, cols: int, bits: int, group: int, device: torch.device
) -> LibLinear:
    if kernel == "gemlite":
        return gemlite_linear(rows, cols, bits, group, device)
    if kernel == "tinygemm":
        if bits != 4:
            raise ValueError("tinygemm is int4 only")
        return tinygemm_linear(rows, cols, group, device)
    raise ValueError(kernel)


def baseline_mlp(
    kernel: str, spec: FFNSpec, recipe: QuantRecipe, device: torch.device, dtype: torch.dtype
) -> MLP:
    """The recipe's FFN through a library kernel: uniform (heavy 0) or heavy bf16 + light lib.
    One light width only (the libraries take one format per GEMM)."""
    (bits,) = recipe.light_counts(spec).keys()
    heavy = recipe.heavy(spec)
    light = -(-(spec.m - heavy) // PAD) * PAD  # padded: zero rows cost the library little
    d = spec.d

    def out_projection() -> nn.Module:
        lib = lib_linear(kernel, light, d, bits, recipe.group, device)
        if not heavy:
            return lib
        dense = DenseLinear(_randn(heavy, d, device=device, dtype=dtype, std=d**-0.5))
        return SplitOutProjection([dense, lib])  # type: ignore[list-item]

    def down_projection() -> nn.Module:
        lib = lib_linear(kernel, d, light, bits, recipe.group, device)
        if not heavy:
            return lib
        dense = DenseLinear(_randn(d, heavy, device=device, dtype=dtype, std=spec.m**-0.5))
        return SplitInProjection([dense, lib])  # type: ignore[list-item]

    gate = out_projection() if spec.gated else None
    return MLP(out_projection(), gate, down_projection(), _ACT[spec.act]).eval()


def baseline_bytes(module: nn.Module) -> int:
    """Stored bytes of a baseline FFN: dense parts' tensors plus each library layer's own."""
    total = 0
    for m in module.modules():
        if isinstance(m, LibLinear):
            total += m.nbytes_
        elif isinstance(m, DenseLinear):
            total += sum(t.numel() * t.element_size() for t in m.parameters())
    return total
