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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError

# Damping multipliers tried in turn when the Cholesky factorisation of the damped Gram fails
# (bounded: a Gram that still fails at 1e4 x the requested damping is not positive semi-definite).
_DAMP_GROWTH = (1.0, 10.0, 100.0, 1e3, 1e4)


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
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
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
    eye = torch.eye(features, dtype=torch.float64, device=w64.device)
    # damp = 0 asks for exact whitening; if that fails, retry from a tiny relative damping.
    tries = (
        [damp * g for g in _DAMP_GROWTH] if damp > 0 else [0.0] + [1e-6 * g for g in _DAMP_GROWTH]
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
    u, s, vh = torch.linalg.svd(w64 @ lower, full_matrices=False)
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
