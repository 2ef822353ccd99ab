"""Scores and heavy sets (method.md): pure functions of statistics and weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats


def neuron_scores(stats: LayerStats, down: Tensor) -> Tensor:
    """s_j = sqrt(S2_j) * ||v_j||: the Frobenius norm of neuron j's output over calibration."""
    if down.shape[1] != stats.neurons:
        raise FFSplitError(
            f"statistics have {stats.neurons} neurons but the down projection has {down.shape[1]}: "
            "the statistics were collected on another model"
        )
    return stats.sum_sq.sqrt() * down.detach().to(torch.float64).norm(dim=0).to(stats.sum_sq.device)


def heavy_count(neurons: int, ratio: float) -> int:
    """|H| = ceil(rho * m) (0 for the no-split baseline)."""
    if not 0 <= ratio < 1:
        raise FFSplitError(f"heavy ratio must be in [0, 1), got {ratio}")
    return math.ceil(ratio * neurons - 1e-9)


def order_by_score(scores: Tensor) -> Tensor:
    """Neuron indices by descending score; ties broken by lower index (deterministic)."""
    m = scores.numel()
    # stable sort on -score keeps index order among equal scores
    return torch.sort(-scores.to(torch.float64), stable=True).indices[:m]


def score_order(scores: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """(heavy, light) index tensors: heavy = top ceil(rho m) by score, light in score order."""
    order = order_by_score(scores)
    k = heavy_count(scores.numel(), ratio)
    return order[:k], order[k:]


def random_order(neurons: int, ratio: float, seed: int, layer: int) -> tuple[Tensor, Tensor]:
    """(heavy, light) for the random-split baseline: same sizes, no score information."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    perm = torch.randperm(neurons, generator=gen)
    k = heavy_count(neurons, ratio)
    return perm[:k], perm[k:]


def jaccard(a: Tensor, b: Tensor) -> float:
    """Overlap of two heavy sets (stability of H across corpora)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0
