"""Per-neuron sufficient statistics of one FFN layer (method.md): pure, streaming, mergeable.

Every field is a sum, a count or a max, so the statistics of N shards merge into those of the
whole set: counts and maxima exactly, S2 up to float64 rounding, the Gram matrices up to float32
rounding of each batch's product (relative 1e-6; float64 products cost ~10x on CPU). Memory is bounded by the layer shape, never by the number of tokens.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.files import parse_json_strict, regular_file, shown

_HEX64 = re.compile(r"[0-9a-f]{64}")

STATS_FORMAT_VERSION = 2  # 2: Grams stored as packed lower triangles (1: full matrices, still read)
GRAMS = ("gram_in", "gram_hidden")
PACKED = "_tril"  # suffix of a packed Gram's tensor name


@dataclass
class LayerStats:
    """Sums over calibration tokens for one FFN layer with m neurons and hidden size d.

    The Grams are full matrices, or, from load_stats(packed=True), their packed lower triangles:
    sums merge and save the same either way, so merging files needs no unpacking.
    """

    tokens: int
    sum_sq: Tensor  # [m] float64: S2_j = sum_t h_j(x_t)^2
    max_abs: Tensor  # [m] float64: M_j = max_t |h_j(x_t)|
    hits: Tensor  # [m] int64: tokens where neuron j is in the layer's top-k output norms
    gram_in: Tensor | None = None  # [d, d] float64: sum_t x_t x_t^T (up/gate input)
    gram_hidden: Tensor | None = None  # [m, m] float64: sum_t h_t h_t^T (down input)
    hit_top_k: int = 1

    @property
    def neurons(self) -> int:
        return self.sum_sq.shape[0]

    def symmetric(self) -> LayerStats:
        """These statistics with bitwise symmetric Grams (see _symmetric)."""
        return replace(
            self,
            gram_in=None if self.gram_in is None else _symmetric(self.gram_in),
            gram_hidden=None if self.gram_hidden is None else _symmetric(self.gram_hidden),
        )

    def to_device(self, device: str | torch.device) -> LayerStats:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return LayerStats(
            self.tokens,
            mv(self.sum_sq),
            mv(self.max_abs),
            mv(self.hits),
            mv(self.gram_in),
            mv(self.gram_hidden),
            self.hit_top_k,
        )

    @classmethod
    def zeros(cls, neurons: int, hidden: int, hit_top_k: int, grams: bool) -> LayerStats:
        f64 = torch.float64
        return cls(
            tokens=0,
            sum_sq=torch.zeros(neurons, dtype=f64),
            max_abs=torch.zeros(neurons, dtype=f64),
            hits=torch.zeros(neurons, dtype=torch.int64),
            gram_in=torch.zeros(hidden, hidden, dtype=f64) if grams else None,
            gram_hidden=torch.zeros(neurons, neurons, dtype=f64) if grams else None,
            hit_top_k=hit_top_k,
        )


def observe(stats: LayerStats, x: Tensor, h: Tensor, down_norms: Tensor) -> None:
    """Accumulate one batch: x [n, d] FFN inputs, h [n, m] hidden activations (down inputs).

    down_norms [m] = ||v_j||, so token t's neuron output norms are |h_tj| * ||v_j||.
    Accumulates in float64 on the tensors' device, then adds into the (CPU or device) stats.
    """
    dev = stats.sum_sq.device
    hf = h.float()
    stats.tokens += h.shape[0]
    h64 = h.to(torch.float64)
    stats.sum_sq += (h64 * h64).sum(0).to(dev)
    habs = hf.abs()
    stats.max_abs.copy_(torch.maximum(stats.max_abs, habs.amax(0).to(dev, torch.float64)))
    out_norm = habs * down_norms.to(h.device, torch.float32)
    top = out_norm.topk(stats.hit_top_k, dim=1).indices
    stats.hits += torch.bincount(top.flatten(), minlength=stats.neurons).to(dev)
    if stats.gram_in is not None:
        # Gram products in float32 per batch (float64 matmuls are ~10x slower on CPU), running sums
        # in float64: shard merges then agree with the whole to float32 rounding of each batch.
        xf = x.float()
        stats.gram_in += (xf.T @ xf).to(dev, torch.float64)
    if stats.gram_hidden is not None:
        stats.gram_hidden += (hf.T @ hf).to(dev, torch.float64)


def _symmetric(gram: Tensor) -> Tensor:
    """gram with its upper triangle mirrored from the lower one.

    X^T X is symmetric in exact arithmetic; CPU GEMMs give it bitwise so (then this is a no-op),
    GPU ones need not. Exact symmetry is what lets files store only the lower triangle and still
    give back the very statistics profiling held in memory. Mirroring the running sums once
    equals mirroring every batch's product, bit for bit (each lower element sums the same values
    in the same order), so profiling does it once, when it hands the statistics out.
    """
    return unpack_symmetric(pack_symmetric(gram))


def merge(a: LayerStats, b: LayerStats) -> LayerStats:
    """Statistics of the union of two disjoint token sets (pure; exact up to float64 sums)."""
    if a.neurons != b.neurons or a.hit_top_k != b.hit_top_k:
        raise FFSplitError(
            f"cannot merge statistics of different layers: {a.neurons} vs {b.neurons} neurons, "
            f"top-k {a.hit_top_k} vs {b.hit_top_k}"
        )
    if (a.gram_in is None) != (b.gram_in is None):
        raise FFSplitError("cannot merge statistics with and without Gram matrices")
    if a.gram_in is not None and b.gram_in is not None and a.gram_in.dim() != b.gram_in.dim():
        raise FFSplitError("cannot merge packed Grams with full ones; load both the same way")

    def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
        return None if x is None or y is None else x + y.to(x.device)

    return LayerStats(
        tokens=a.tokens + b.tokens,
        sum_sq=a.sum_sq + b.sum_sq.to(a.sum_sq.device),
        max_abs=torch.maximum(a.max_abs, b.max_abs.to(a.max_abs.device)),
        hits=a.hits + b.hits.to(a.hits.device),
        gram_in=add(a.gram_in, b.gram_in),
        gram_hidden=add(a.gram_hidden, b.gram_hidden),
        hit_top_k=a.hit_top_k,
    )


@dataclass
class ModelStats:
    """Statistics of every FFN layer of one model, plus what produced them."""

    layers: dict[int, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def merged(self, other: ModelStats) -> ModelStats:
        if set(self.layers) != set(other.layers):
            raise FFSplitError(
                f"cannot merge statistics over different layers: {sorted(self.layers)} vs "
                f"{sorted(other.layers)}"
            )
        for key in ("model_sha256", "profile"):
            if key in self.meta and key in other.meta and self.meta[key] != other.meta[key]:
                raise FFSplitError(f"cannot merge statistics with different {key}")
        meta = {**self.meta, "tokens": self.tokens + other.tokens}
        return ModelStats({i: merge(s, other.layers[i]) for i, s in self.layers.items()}, meta)

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).tokens if self.layers else 0

    def to(self, device: str | torch.device) -> ModelStats:
        return ModelStats({i: s.to_device(device) for i, s in self.layers.items()}, dict(self.meta))


def merge_all(parts: Iterable[ModelStats]) -> ModelStats:
    """Merge shard statistics (order-independent up to float64 rounding)."""
    parts = list(parts)
    if not parts:
        raise FFSplitError("no statistics to merge")
    out = parts[0]
    for p in parts[1:]:
        out = out.merged(p)
    return out


@functools.lru_cache(maxsize=8)
def _triangle_index(n: int) -> tuple[Tensor, Tensor]:
    """Flat positions in an [n, n] matrix of the lower triangle, row by row, and their mirrors."""
    rows, cols = torch.tril_indices(n, n)
    return rows * n + cols, cols * n + rows


def pack_symmetric(gram: Tensor) -> Tensor:
    """The lower triangle of a symmetric [n, n] matrix, row by row ([n (n + 1) / 2]).

    Half the bytes of the full matrix: statistics files are mostly Grams (645 MB for SmolLM2 in
    full), and the pipeline writes and reads them between stages.
    """
    lower, _ = _triangle_index(gram.shape[0])
    return gram.reshape(-1).index_select(0, lower.to(gram.device))


def unpack_symmetric(packed: Tensor) -> Tensor:
    """The symmetric [n, n] matrix whose lower triangle `packed` holds (pack_symmetric's inverse)."""
    n = triangle_side(packed.numel())
    if n is None:
        raise FFSplitError(f"{packed.numel()} values are no packed triangle")
    lower, upper = (i.to(packed.device) for i in _triangle_index(n))
    out = packed.new_empty(n * n)
    out.index_copy_(0, lower, packed)
    out.index_copy_(0, upper, packed)
    return out.view(n, n)


def triangle_side(count: int) -> int | None:
    """n with n (n + 1) / 2 == count, else None."""
    n = (math.isqrt(8 * count + 1) - 1) // 2
    return n if n * (n + 1) // 2 == count else None


def _packed(gram: Tensor) -> Tensor:
    return gram.contiguous() if gram.dim() == 1 else pack_symmetric(gram)


def save_stats(stats: ModelStats, path: str | Path) -> Path:
    """One safetensors file, written atomically (temp + rename), metadata as JSON; Grams packed."""
    from safetensors.torch import save_file

    from ffsplit.files import atomic_path

    tensors: dict[str, Tensor] = {}
    for i, s in stats.layers.items():
        tensors[f"layer.{i}.sum_sq"] = s.sum_sq.cpu().contiguous()
        tensors[f"layer.{i}.max_abs"] = s.max_abs.cpu().contiguous()
        tensors[f"layer.{i}.hits"] = s.hits.cpu().contiguous()
        tensors[f"layer.{i}.tokens"] = torch.tensor([s.tokens], dtype=torch.int64)
        tensors[f"layer.{i}.hit_top_k"] = torch.tensor([s.hit_top_k], dtype=torch.int64)
        if s.gram_in is not None and s.gram_hidden is not None:
            tensors[f"layer.{i}.gram_in{PACKED}"] = _packed(s.gram_in.cpu())
            tensors[f"layer.{i}.gram_hidden{PACKED}"] = _packed(s.gram_hidden.cpu())
    meta = {
        "format": "ffsplit-stats",
        "format_version": str(STATS_FORMAT_VERSION),
        "meta": json.dumps(stats.meta, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_stats(
    path: str | Path, device: str | torch.device = "cpu", *, packed: bool = False
) -> ModelStats:
    """Load and validate a statistics file (finite values, consistent shapes).

    packed: Grams stay packed lower triangles (for merging and saving again: no unpacking).
    """
    from safetensors import safe_open

    from ffsplit.models.loading import all_finite

    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise FFSplitError(f"statistics file not found: {shown(path)}")
    regular_file(path, "a statistics file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise FFSplitError(f"{path}: not a readable safetensors statistics file ({exc})") from None
    if header.get("format") != "ffsplit-stats":
        raise FFSplitError(
            f"{path}: not an ffsplit statistics file (format={header.get('format')!r})"
        )
    version = str(header.get("format_version", "0"))
    if not version.isdigit():
        raise FFSplitError(f"{path}: statistics format_version {version!r} is not an integer")
    if int(version) > STATS_FORMAT_VERSION:
        raise FFSplitError(
            f"{path}: statistics format {version} is newer than this ffsplit "
            f"reads ({STATS_FORMAT_VERSION}); upgrade ffsplit"
        )
    odd = [k for k in tensors if not re.fullmatch(r"layer\.\d{1,6}\.\w+", k)]
    if odd:
        raise FFSplitError(f"{path}: unexpected tensor name(s) {odd[:3]}: not a statistics file")
    tensors = _grams_as(path, tensors, packed)
    layer_ids = sorted({int(k.split(".")[1]) for k in tensors})
    layers: dict[int, LayerStats] = {}
    for i in layer_ids:

        def get(name: str, i: int = i) -> Tensor | None:
            return tensors.get(f"layer.{i}.{name}")

        sum_sq, max_abs, hits = get("sum_sq"), get("max_abs"), get("hits")
        if any(t is None for t in (sum_sq, max_abs, hits, get("tokens"), get("hit_top_k"))):
            raise FFSplitError(f"{path}: layer {i} is missing statistics")
        for name, t in (
            ("sum_sq", sum_sq),
            ("max_abs", max_abs),
            ("gram_in", get("gram_in")),
            ("gram_hidden", get("gram_hidden")),
        ):
            if t is not None and not all_finite(t):
                raise FFSplitError(f"{path}: layer {i} {name} holds NaN or inf; re-run profiling")
        _check_layer_shapes(path, i, tensors)
        _check_layer_values(path, i, tensors)
        layers[i] = LayerStats(
            tokens=int(get("tokens")[0]),  # type: ignore[index]
            sum_sq=sum_sq.to(device),
            max_abs=max_abs.to(device),
            hits=hits.to(device),
            gram_in=None if get("gram_in") is None else get("gram_in").to(device),  # type: ignore[union-attr]
            gram_hidden=None if get("gram_hidden") is None else get("gram_hidden").to(device),  # type: ignore[union-attr]
            hit_top_k=int(get("hit_top_k")[0]),  # type: ignore[index]
        )
    return ModelStats(layers, _metadata(path, header.get("meta", "{}")))


def _metadata(path: Path, text: str) -> dict[str, Any]:
    """The metadata JSON: strict (no duplicate keys, bounded nesting), an object, and a
    model_sha256 (when given) that is a sha256, since compression trusts it to match the model."""
    meta = parse_json_strict(text.encode("utf-8"), f"{shown(path)}: statistics metadata")
    if not isinstance(meta, dict):
        raise FFSplitError(
            f"{shown(path)}: statistics metadata must be a JSON object, got {type(meta).__name__}"
        )
    digest = meta.get("model_sha256")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.fullmatch(digest)):
        raise FFSplitError(
            f"{shown(path)}: model_sha256 must be a sha256, got {str(digest)[:80]!r}"
        )
    return meta


def _check_layer_values(path: Path, i: int, tensors: Mapping[str, Tensor]) -> None:
    """Values that counts and sums of squares must have: integer counts, sums of squares >= the
    largest square, exactly k hits per token, a Gram diagonal equal to the sums of squares."""

    def get(name: str) -> Tensor | None:
        return tensors.get(f"layer.{i}.{name}")

    where = f"{shown(path)}: layer {i}"
    for name in ("hits", "tokens", "hit_top_k"):
        if get(name).is_floating_point():  # type: ignore[union-attr]
            raise FFSplitError(f"{where} {name} must be integer counts; the file is damaged")
    for name in ("sum_sq", "max_abs"):
        if not get(name).is_floating_point():  # type: ignore[union-attr]
            raise FFSplitError(f"{where} {name} must be floating point; the file is damaged")
    sum_sq, max_abs, hits = get("sum_sq"), get("max_abs"), get("hits")
    tokens, top_k = int(get("tokens")[0]), int(get("hit_top_k")[0])  # type: ignore[index]
    if tokens < 1:
        raise FFSplitError(f"{where} covers {tokens} tokens; re-run profiling")
    if bool((sum_sq < 0).any()) or bool((max_abs < 0).any()) or bool((hits < 0).any()):
        raise FFSplitError(f"{where} holds negative sums, maxima or counts; the file is damaged")
    square = max_abs.double() ** 2
    if bool((square > sum_sq.double() * (1 + 1e-6) + 1e-30).any()):
        raise FFSplitError(f"{where}: a max_abs exceeds its sum of squares; the file is damaged")
    if int(hits.sum()) != tokens * top_k:
        raise FFSplitError(
            f"{where}: {int(hits.sum())} hits for {tokens} tokens at top-{top_k} (each token gives "
            "exactly k); the file is damaged"
        )
    gram = get("gram_hidden")
    if gram is not None and gram.dim() == 2:
        diagonal, s2 = gram.diagonal().double(), sum_sq.double()
        if bool(((diagonal - s2).abs() > 1e-3 * s2.abs() + 1e-6 * float(s2.abs().max())).any()):
            raise FFSplitError(
                f"{where}: gram_hidden's diagonal is not sum_sq; the file is damaged or mixed"
            )


def _grams_as(path: Path, tensors: dict[str, Tensor], packed: bool) -> dict[str, Tensor]:
    """tensors with every Gram under its plain name, as a packed triangle or a full matrix."""
    out = dict(tensors)
    for name, stored in tensors.items():
        if packed and name.rsplit(".", 1)[-1] in GRAMS and stored.dim() == 2:  # format 1
            n = stored.shape[0]
            if stored.shape != (n, n):
                raise FFSplitError(
                    f"{path}: {name} has shape {list(stored.shape)}, not square; the file is "
                    "damaged"
                )
            out[name] = pack_symmetric(stored)
        if not name.endswith(PACKED):
            continue
        full = name[: -len(PACKED)]
        if full.rsplit(".", 1)[-1] not in GRAMS:
            raise FFSplitError(f"{path}: unexpected tensor name {name!r}: not a statistics file")
        if full in tensors:
            raise FFSplitError(
                f"{path}: {full} is stored both packed and full: the file is damaged"
            )
        if stored.dim() != 1 or triangle_side(stored.numel()) is None:
            raise FFSplitError(
                f"{path}: {name} has shape {list(stored.shape)}, not a packed triangle "
                "(n (n + 1) / 2 values); the file is damaged"
            )
        del out[name]
        out[full] = stored if packed else unpack_symmetric(stored)
    return out


def _check_layer_shapes(path: Path, i: int, tensors: Mapping[str, Tensor]) -> None:
    """One layer's tensors agree: [m] vectors, [1] counts, [d, d] and [m, m] Grams, 1 <= k <= m."""

    def shape(name: str) -> tuple[int, ...] | None:
        t = tensors.get(f"layer.{i}.{name}")
        return None if t is None else tuple(t.shape)

    def square(name: str) -> tuple[int, ...] | None:  # a packed Gram as the matrix it holds
        got = shape(name)
        side = triangle_side(got[0]) if got is not None and len(got) == 1 else None
        return got if side is None else (side, side)

    m = (shape("sum_sq") or (0,))[0]
    gram_in = square("gram_in")
    expected = {
        "sum_sq": (m,),
        "max_abs": (m,),
        "hits": (m,),
        "tokens": (1,),
        "hit_top_k": (1,),
        "gram_hidden": (m, m),
        "gram_in": (gram_in[0], gram_in[0]) if gram_in else None,
    }
    for name, want in expected.items():
        got = square(name) if name in GRAMS else shape(name)
        if got is not None and (got != want or m < 1):
            raise FFSplitError(
                f"{path}: layer {i} {name} has shape {list(got)}, expected {list(want or ())}; "
                "the file is damaged"
            )
    tokens = int(tensors[f"layer.{i}.tokens"][0])
    top_k = int(tensors[f"layer.{i}.hit_top_k"][0])
    if tokens < 0 or not 1 <= top_k <= m:
        raise FFSplitError(f"{path}: layer {i} has tokens={tokens}, hit_top_k={top_k}: damaged")


def hit_top_k(neurons: int, fraction: float) -> int:
    """k for the hit count: the top `fraction` of a layer's neurons, at least one."""
    return max(1, math.ceil(fraction * neurons))


def summary(stats: LayerStats, down_norms: Tensor) -> Mapping[str, float]:
    """The observation (method.md): share of total output norm held by the top 1/5/10% neurons."""
    score_sq = stats.sum_sq * down_norms.to(stats.sum_sq) ** 2  # squared Frobenius norms
    ordered = score_sq.sort(descending=True).values
    total = float(ordered.sum()) or 1.0
    m = ordered.numel()
    out = {}
    for pct in (1, 5, 10):
        k = max(1, math.ceil(pct / 100 * m))
        out[f"top{pct}_share"] = float(ordered[:k].sum()) / total
    out["hit_rate_top1pct"] = float(
        stats.hits[score_sq.argsort(descending=True)[: max(1, math.ceil(0.01 * m))]].sum()
    ) / max(1, stats.tokens * stats.hit_top_k)
    return out
