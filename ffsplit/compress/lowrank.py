"""Low-rank factorisation of weight matrices: plain truncated SVD and activation-aware SVD.

Pure functions on tensors. A weight ``W [out, in]`` (``nn.Linear`` convention) is replaced by
``a [out, r] @ b [r, in]``, so a layer computes ``x @ b.T @ a.T``.

Both functions compute in float64: a truncated SVD is only as good as its small singular values, and
the whitened variant multiplies by a Cholesky factor whose conditioning is the square root of the
Gram's (calibration inputs of LLM FFNs are strongly anisotropic). The matrices here are one FFN's
(at most a few thousand on a side), so float64 costs seconds, not minutes. Factors come back in
float32; the caller casts them to the storage dtype.

The singular values are split as ``sqrt(S)`` on both sides (``a = U sqrt(S)``, ``b = sqrt(S) V^T``),
as in SVD-LLM: both factors then have the same scale, which keeps them well inside the range of 16-bit
storage and gives the two matmuls balanced rounding error. The product is the same either way.

On CUDA the SVD comes from ``eigh`` of the smaller Gram side (:func:`svd_via_gram`); CPU
results use LAPACK's SVD and are unchanged by that.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError

# Damping multipliers tried in turn when the Cholesky factorisation of the damped Gram fails
# (bounded: a Gram that still fails at 1e4 x the requested damping is not positive semi-definite).
_DAMP_GROWTH = (1.0, 10.0, 100.0, 1e3, 1e4)

# Decompositions do not depend on the rank, so a sweep over budgets can reuse them: inside
# `reuse_decompositions()` each (weight, gram, damping) is decomposed once. Off by default, since
# entries are large (float64 factors of one light matrix).
_decompositions: OrderedDict[tuple, tuple] | None = None
_decompositions_limit = 0


@contextlib.contextmanager
def reuse_decompositions(max_entries: int = 256) -> Iterator[None]:
    """Within this block, repeated factorisations of the same matrix at other ranks reuse its SVD."""
    global _decompositions, _decompositions_limit
    previous = (_decompositions, _decompositions_limit)
    _decompositions, _decompositions_limit = OrderedDict(), max_entries
    try:
        yield
    finally:
        _decompositions, _decompositions_limit = previous


def _key(*tensors: Tensor, extra: object = None) -> tuple:
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().tobytes())
    return (digest.hexdigest(), extra)


def _cached(key_fn, compute):  # noqa: ANN001, ANN202 - tiny private helper
    if _decompositions is None:
        return compute()
    key = key_fn()
    if key in _decompositions:
        _decompositions.move_to_end(key)
        return _decompositions[key]
    value = compute()
    _decompositions[key] = value
    while len(_decompositions) > _decompositions_limit:
        _decompositions.popitem(last=False)
    return value


@dataclass(frozen=True)
class WhitenedFactors:
    """Result of :func:`whitened_svd`: factors plus how they were obtained (for manifests and logs).

    ``damp`` is the relative damping actually used (``None`` when the plain SVD fallback ran),
    ``fallback`` says why the plain SVD was used instead (``None`` when whitening ran).
    """

    a: Tensor
    b: Tensor
    damp: float | None
    fallback: str | None


def check_rank(weight: Tensor, rank: int, where: str) -> None:
    """Raise FFSplitError unless ``rank`` is an int in ``1..min(out, in)`` of ``weight``."""
    limit = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise FFSplitError(
            f"{where}: rank {rank!r} is out of range for a {tuple(weight.shape)} matrix; "
            f"use an integer in 1..{limit}"
        )


def _check_weight(weight: Tensor, where: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise FFSplitError(
            f"{where}: weight must be a 2-D floating tensor [out, in], got {weight!r}"
        )
    if weight.numel() == 0:
        raise FFSplitError(f"{where}: weight {tuple(weight.shape)} is empty")
    if not torch.isfinite(weight).all():
        raise FFSplitError(f"{where}: weight {tuple(weight.shape)} holds NaN or Inf values")


def svd_via_gram(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(u, s, vh)`` of a float64 matrix from ``eigh`` of its smaller Gram side.

    Why: ``torch.linalg.svd`` on CUDA runs cuSOLVER's iterative SVDs (Jacobi, else QR sweeps);
    ``eigh`` of the 4k x 4k Gram of a 7B FFN's light matrix (about 10k x 4k) is one dense
    symmetric solve plus two matrix products. With it the three light matrices of a Llama-2-7B
    layer compress in about 0.44 s on an H200 (bench/results/multigpu-h200.json).
    Squaring the matrix squares its condition number, so singular values below
    ``sqrt(k * eps) * s_max`` carry no accurate digits: their singular vectors on the larger side
    are returned as zeros (truncated SVDs keep the largest values, far above that floor). Signs of
    singular vectors may differ from ``torch.linalg.svd``; every product ``u_i s_i vh_i`` agrees.
    """
    rows, cols = matrix.shape
    tall = rows >= cols
    gram = matrix.T @ matrix if tall else matrix @ matrix.T
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    s = values.sqrt()
    floor = s[0] * math.sqrt(min(rows, cols) * torch.finfo(matrix.dtype).eps)
    inverse = torch.where(s > floor, 1 / s.clamp_min(torch.finfo(matrix.dtype).tiny), 0)
    if tall:
        return (matrix @ vectors) * inverse, s, vectors.T
    return vectors, s, (vectors.T @ matrix) * inverse[:, None]


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD: LAPACK's on CPU (results unchanged), the Gram-side eigh on CUDA (speed)."""
    if matrix.device.type == "cuda":
        return svd_via_gram(matrix)
    return torch.linalg.svd(matrix, full_matrices=False)


def _split_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncate an SVD to ``rank`` and split sqrt(S) on both sides (float64 in, float64 out)."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation ``a @ b`` of ``weight`` in Frobenius norm (Eckart-Young).

    The weak baseline: it treats every input direction as equally important. Returns float32
    ``a [out, rank]`` and ``b [rank, in]`` on the weight's device.
    """
    _check_weight(weight, "svd_factors")
    check_rank(weight, rank, "svd_factors")
    u, s, vh = _cached(
        lambda: _key(weight, extra="svd"),
        lambda: _svd(weight.detach().to(torch.float64)),
    )
    a, b = _split_factors(u, s, vh, rank)
    return a.float(), b.float()


def whitened_svd(
    weight: Tensor, rank: int, gram: Tensor, tokens: int, damp: float = 1e-2
) -> WhitenedFactors:
    """Activation-aware truncated SVD (SVD-LLM, arXiv 2403.07378): minimises ``||(W - a b) X||_F``.

    ``gram`` is ``sum_t x_t x_t^T`` over ``tokens`` calibration inputs ``x_t`` of this layer, so
    ``C = gram / tokens`` is their second moment. With ``C + damp * mean(diag C) * I = L L^T``
    (Cholesky), ``||(W - W') X||_F^2 = tokens * ||(W - W') L||_F^2`` up to the damping, so the best
    ``W'`` is the truncated SVD of ``W L`` mapped back by ``L^{-1}`` (a triangular solve, never an
    explicit inverse). Damping keeps ``L`` invertible when some input directions are never excited.

    If the Cholesky fails, damping grows tenfold (at most 10^4 x; ``damp`` in the result is the one
    used); a zero Gram or zero ``tokens`` carry no information, so plain SVD runs instead and
    ``fallback`` says why. A Gram that no damping makes positive definite is an error.
    """
    where = "whitened_svd"
    _check_weight(weight, where)
    check_rank(weight, rank, where)
    features = weight.shape[1]
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (features, features):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise FFSplitError(
            f"{where}: gram must be [{features}, {features}] (the weight's input dimension), got {shape}"
        )
    if not torch.isfinite(gram).all():
        raise FFSplitError(f"{where}: gram holds NaN or Inf values; recompute the layer statistics")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise FFSplitError(f"{where}: tokens must be a non-negative int, got {tokens!r}")
    if not isinstance(damp, int | float) or not math.isfinite(damp) or damp < 0:
        raise FFSplitError(f"{where}: damp must be a finite number >= 0, got {damp!r}")

    def plain(reason: str) -> WhitenedFactors:
        a, b = svd_factors(weight, rank)
        return WhitenedFactors(a=a, b=b, damp=None, fallback=reason)

    if tokens == 0:
        return plain("no calibration tokens")
    w64 = weight.detach().to(torch.float64)
    second_moment = gram.detach().to(device=w64.device, dtype=torch.float64) / tokens
    second_moment = (second_moment + second_moment.T) / 2  # symmetrise accumulated rounding
    if bool((second_moment.diagonal() < 0).any()):
        raise FFSplitError(
            f"{where}: gram has negative diagonal entries, so it is no sum of x x^T; "
            f"recompute the layer statistics"
        )
    scale = second_moment.diagonal().mean().item()
    if scale == 0:
        return plain("gram is zero (no input energy)")

    def decompose() -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
        eye = torch.eye(features, dtype=torch.float64, device=w64.device)
        # damp = 0 asks for exact whitening; if that fails, retry from a tiny relative damping.
        tries = (
            [damp * g for g in _DAMP_GROWTH]
            if damp > 0
            else [0.0] + [1e-6 * g for g in _DAMP_GROWTH]
        )
        for used in tries:
            lower, info = torch.linalg.cholesky_ex(second_moment + used * scale * eye)
            if info.item() == 0 and bool(torch.all(lower.diagonal() > 0)):
                break
        else:
            raise FFSplitError(
                f"{where}: gram [{features}, {features}] is not positive semi-definite (Cholesky failed "
                f"even with damping {used:g}); recompute the layer statistics"
            )
        u, s, vh = _svd(w64 @ lower)
        return lower, u, s, vh, used

    lower, u, s, vh, used = _cached(
        lambda: _key(weight, gram, extra=("whitened", tokens, damp)), decompose
    )
    a, b_white = _split_factors(u, s, vh, rank)
    # b = b_white @ L^{-1}: solve b @ L = b_white with L lower triangular.
    b = torch.linalg.solve_triangular(lower, b_white, upper=False, left=False)
    return WhitenedFactors(a=a.float(), b=b.float(), damp=float(used), fallback=None)


def whitened_svd_factors(
    weight: Tensor, rank: int, gram: Tensor, tokens: int, damp: float = 1e-2
) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of :func:`whitened_svd`, warning when damping grew or plain SVD ran instead."""
    result = whitened_svd(weight, rank, gram, tokens, damp)
    if result.fallback is not None:
        warnings.warn(f"whitened_svd_factors: plain SVD used: {result.fallback}", stacklevel=2)
    elif result.damp is not None and result.damp > damp:
        warnings.warn(
            f"whitened_svd_factors: Cholesky needed damping {result.damp:g} (asked {damp:g})",
            stacklevel=2,
        )
    return result.a, result.b


def output_error(weight: Tensor, a: Tensor, b: Tensor, gram: Tensor) -> float:
    """Squared output error ``||(W - a b) X||_F^2`` from the Gram ``X X^T`` alone: ``trace(E gram E^T)``, ``E = W - a b``.

    Lets callers compare factorisations on calibration inputs without keeping the inputs.
    """
    error = weight.detach().to(torch.float64) - a.to(torch.float64) @ b.to(torch.float64)
    return float(((error @ gram.to(torch.float64)) * error).sum().item())
