"""The paper's premise, measured (issue 6): a few FFN neurons carry most of the output norm.

Pure functions: statistics and down-projection weights in, plain JSON-ready dicts out, so the
benchmark, the sweep flow and the plots share one implementation. Definitions (method.md):
neuron j's score s_j = sqrt(S2_j) * ||v_j|| is the Frobenius norm of its output over the
calibration tokens, so s_j^2 = sum_t ||h_j(x_t) v_j||^2 is its output *energy*.

- share (top p%): sum of s_j^2 over the ceil(p% m) highest-scoring neurons / sum_j s_j^2; a uniform
  spread gives p%. `share_linear` is the same with s_j in place of s_j^2. (The energies of the
  neurons do not sum to ||FFN(x)||^2, cross terms are left out: this is the share of the sum of
  per-neuron output norms, the quantity the heavy/light split keeps or compresses.)
- hits: `LayerStats.hits[j]` counts the tokens on which neuron j is among the k largest output
  norms |h_j(x_t)| ||v_j|| of its layer (k = `hit_top_k`). With H the heavy set:
  `heavy_hit_rate` = mean_{j in H} hits_j / n (how often one heavy neuron is in a token's top-k),
  against `uniform_hit_rate` = k / m (every neuron equally likely); `hit_lift` is their ratio;
  `heavy_slot_share` = sum_{j in H} hits_j / (n k), the share of all top-k slots that heavy
  neurons fill, against |H| / m.
- coverage (needs per-token data, `CoverageCounts`): the fraction of tokens with at least one heavy
  neuron in their top-k, and with a heavy neuron as their single largest output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats, ModelStats
from ffsplit.selection import heavy_count, jaccard, neuron_scores, order_by_score, score_order

SHARE_PERCENTS = (1, 5, 10)  # method.md: share of output norm held by the top 1/5/10% of neurons
DEFAULT_HEAVY_RATIO = 0.01  # issue 6: the heavy set of the observation is the top 1%


def _top_count(neurons: int, percent: float) -> int:
    """ceil(p% m), at least one neuron."""
    return max(1, heavy_count(neurons, percent / 100))


def gini(values: Tensor) -> float:
    """Gini coefficient of non-negative values: 0 for a uniform spread, (m-1)/m when one holds all."""
    x = values.detach().to(torch.float64).flatten().sort().values
    if x.numel() == 0 or bool((x < 0).any()):
        raise FFSplitError("gini: values must be a non-empty tensor of non-negative numbers")
    total = float(x.sum())
    if total == 0:
        return 0.0
    m = x.numel()
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    return float(((2 * ranks - m - 1) * x).sum()) / (m * total)


def fraction_for_share(values: Tensor, share: float) -> float:
    """Smallest fraction of entries (largest first) whose sum reaches `share` of the total."""
    x = values.detach().to(torch.float64).flatten().sort(descending=True).values
    total = float(x.sum())
    if total == 0:
        return 1.0
    # a relative slack so that float rounding of equal values does not cost one extra entry
    target = torch.tensor([share * total * (1 - 1e-12)], dtype=torch.float64)
    reached = int(torch.searchsorted(x.cumsum(0), target).item())
    return min(x.numel(), reached + 1) / x.numel()


def layer_observation(
    stats: LayerStats, down: Tensor, heavy_ratio: float = DEFAULT_HEAVY_RATIO
) -> dict[str, Any]:
    """Concentration and hit frequency of one FFN layer (definitions in the module docstring).

    down: the layer's down projection [d, m] (nn.Linear convention). Keys:
    top{p}_share (of sum s_j^2), top{p}_share_linear (of sum s_j), uniform share p/100 is implied;
    neurons_for_half_energy (fraction of neurons holding 50% of sum s_j^2; uniform 0.5);
    score_gini; heavy/hit fields; max_over_median_score.
    """
    if not 0 < heavy_ratio < 1:
        raise FFSplitError(f"layer_observation: heavy_ratio must be in (0, 1), got {heavy_ratio}")
    if stats.tokens <= 0:
        raise FFSplitError("layer_observation: the statistics hold no tokens; profile first")
    scores = neuron_scores(stats, down).cpu()
    m = scores.numel()
    ordered = scores[order_by_score(scores)]
    energy = ordered**2
    total_energy = float(energy.sum()) or 1.0
    total_linear = float(ordered.sum()) or 1.0
    out: dict[str, Any] = {"neurons": m, "tokens": stats.tokens}
    for p in SHARE_PERCENTS:
        k = _top_count(m, p)
        out[f"top{p}_share"] = float(energy[:k].sum()) / total_energy
        out[f"top{p}_share_linear"] = float(ordered[:k].sum()) / total_linear
    out["neurons_for_half_energy"] = fraction_for_share(energy, 0.5)
    out["score_gini"] = gini(scores)
    median = float(ordered.median())
    out["max_over_median_score"] = float(ordered[0]) / median if median > 0 else math.inf

    heavy, _ = score_order(scores, heavy_ratio)
    k = stats.hit_top_k
    hits = stats.hits.cpu().to(torch.float64)
    heavy_hits = float(hits[heavy].sum())
    out["heavy_ratio"] = heavy_ratio
    out["heavy_neurons"] = int(heavy.numel())
    out["hit_top_k"] = k
    out["heavy_hit_rate"] = heavy_hits / heavy.numel() / stats.tokens
    out["uniform_hit_rate"] = k / m
    out["hit_lift"] = out["heavy_hit_rate"] / out["uniform_hit_rate"]
    out["heavy_slot_share"] = heavy_hits / (stats.tokens * k)
    out["uniform_slot_share"] = heavy.numel() / m
    return out


def _mean_of_numbers(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over layers of every numeric key present in all rows (finite values only)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows if key in r and math.isfinite(float(r[key]))]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _check_downs(stats: ModelStats, downs: Mapping[int, Tensor]) -> list[int]:
    layers = sorted(stats.layers)
    missing = [i for i in layers if i not in downs]
    if missing:
        raise FFSplitError(
            f"no down projection given for layers {missing}: pass the down weight of every "
            "profiled layer (adapter.weights(model, handle).down)"
        )
    if not layers:
        raise FFSplitError("the statistics hold no layers")
    return layers


def model_observation(
    stats: ModelStats, downs: Mapping[int, Tensor], heavy_ratio: float = DEFAULT_HEAVY_RATIO
) -> dict[str, Any]:
    """layer_observation for every profiled layer: {"layers": [row per layer], "mean": {...}}."""
    layers = _check_downs(stats, downs)
    rows = [
        {"layer": i, **layer_observation(stats.layers[i], downs[i], heavy_ratio)} for i in layers
    ]
    mean = _mean_of_numbers(rows)
    mean.pop("layer", None)
    return {"heavy_ratio": heavy_ratio, "tokens": stats.tokens, "layers": rows, "mean": mean}


def expected_random_jaccard(neurons: int, size: int) -> float:
    """E[|A & B| / |A | B|] for two independent uniformly random `size`-subsets of `neurons`.

    |A & B| is hypergeometric(neurons, size, size); summed exactly over its support in log space.
    """
    if not 0 <= size <= neurons:
        raise FFSplitError(f"expected_random_jaccard: size {size} not in [0, {neurons}]")
    if size == 0:
        return 1.0

    def log_comb(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    low = max(0, 2 * size - neurons)
    log_total = log_comb(neurons, size)
    expected = 0.0
    for x in range(low, size + 1):
        log_p = log_comb(size, x) + log_comb(neurons - size, size - x) - log_total
        expected += math.exp(log_p) * x / (2 * size - x)
    return expected


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (ranks by order_by_score, ties by index)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise FFSplitError(
            f"spearman: need two 1-D vectors of equal length >= 2, got {a.shape}, {b.shape}"
        )

    def ranks(x: Tensor) -> Tensor:
        r = torch.empty(x.numel(), dtype=torch.float64)
        r[order_by_score(x)] = torch.arange(x.numel(), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def heavy_set_stability(
    stats_a: ModelStats,
    stats_b: ModelStats,
    downs: Mapping[int, Tensor],
    ratio: float = DEFAULT_HEAVY_RATIO,
) -> dict[str, Any]:
    """How much the heavy set moves between two calibration corpora, per layer.

    Per layer: jaccard of the two heavy sets (selection.score_order), random_jaccard (its
    expectation for two random sets of the same size, for context), overlap = |A & B| / |A|, and
    the Spearman correlation of the two score vectors.
    """
    layers = _check_downs(stats_a, downs)
    if sorted(stats_b.layers) != layers:
        raise FFSplitError(
            f"heavy_set_stability: the two statistics cover different layers: {layers} vs "
            f"{sorted(stats_b.layers)}"
        )
    rows = []
    for i in layers:
        scores_a = neuron_scores(stats_a.layers[i], downs[i]).cpu()
        scores_b = neuron_scores(stats_b.layers[i], downs[i]).cpu()
        heavy_a, _ = score_order(scores_a, ratio)
        heavy_b, _ = score_order(scores_b, ratio)
        size = heavy_a.numel()
        common = len(set(heavy_a.tolist()) & set(heavy_b.tolist()))
        rows.append(
            {
                "layer": i,
                "heavy_neurons": size,
                "jaccard": jaccard(heavy_a, heavy_b),
                "random_jaccard": expected_random_jaccard(scores_a.numel(), size),
                "overlap": common / size if size else 1.0,
                "spearman": spearman(scores_a, scores_b),
            }
        )
    mean = _mean_of_numbers(rows)
    mean.pop("layer", None)
    return {"ratio": ratio, "layers": rows, "mean": mean}


# ------------------------------------------------------------------------ per-token coverage


@dataclass
class CoverageCounts:
    """Per-token counts for one layer: how often a fixed heavy set holds a token's top neurons."""

    neurons: int
    heavy: int  # |H|
    top_k: int
    tokens: int = 0
    covered: int = 0  # tokens with at least one heavy neuron among their top-k output norms
    top1_heavy: int = 0  # tokens whose largest output norm is a heavy neuron's
    heavy_slots: int = 0  # (token, top-k slot) pairs filled by heavy neurons

    def merged(self, other: CoverageCounts) -> CoverageCounts:
        """Counts of the union of two disjoint token sets (exact)."""
        if (self.neurons, self.heavy, self.top_k) != (other.neurons, other.heavy, other.top_k):
            raise FFSplitError("cannot merge coverage counts of different layers or heavy sets")
        return CoverageCounts(
            self.neurons,
            self.heavy,
            self.top_k,
            self.tokens + other.tokens,
            self.covered + other.covered,
            self.top1_heavy + other.top1_heavy,
            self.heavy_slots + other.heavy_slots,
        )

    def to_dict(self) -> dict[str, Any]:
        """Rates and what a random heavy set of the same size would give."""
        m, h, k, n = self.neurons, self.heavy, self.top_k, max(1, self.tokens)
        # P(a random h-subset misses all k top neurons) = C(m-h, k) / C(m, k)
        miss = (
            math.exp(
                math.lgamma(m - h + 1)
                + math.lgamma(m - k + 1)
                - math.lgamma(m - h - k + 1)
                - math.lgamma(m + 1)
            )
            if m - h >= k
            else 0.0
        )
        return {
            "tokens": self.tokens,
            "heavy_neurons": h,
            "top_k": k,
            "covered_rate": self.covered / n,
            "random_covered_rate": 1.0 - miss,
            "top1_heavy_rate": self.top1_heavy / n,
            "random_top1_rate": h / m,
            "heavy_slot_share": self.heavy_slots / (n * k),
            "random_slot_share": h / m,
        }


def coverage_counts(h: Tensor, down_norms: Tensor, heavy: Tensor, top_k: int) -> CoverageCounts:
    """Coverage counts of one batch of hidden activations h [n, m] (the down projection's input)."""
    h2 = h.reshape(-1, h.shape[-1])
    m = h2.shape[1]
    if down_norms.shape != (m,):
        raise FFSplitError(f"coverage_counts: down norms {tuple(down_norms.shape)} != ({m},)")
    if not 1 <= top_k <= m:
        raise FFSplitError(f"coverage_counts: top_k must be in [1, {m}], got {top_k}")
    mask = torch.zeros(m, dtype=torch.bool, device=h2.device)
    mask[heavy.to(h2.device)] = True
    out_norm = h2.float().abs() * down_norms.to(h2.device, torch.float32)
    top = out_norm.topk(top_k, dim=1).indices  # sorted: column 0 is the largest
    is_heavy = mask[top]
    return CoverageCounts(
        neurons=m,
        heavy=int(mask.sum()),
        top_k=top_k,
        tokens=h2.shape[0],
        covered=int(is_heavy.any(dim=1).sum()),
        top1_heavy=int(is_heavy[:, 0].sum()),
        heavy_slots=int(is_heavy.sum()),
    )


def coverage_summary(counts: Mapping[int, CoverageCounts]) -> dict[str, Any]:
    """{"layers": [row per layer], "mean": {...}} from per-layer counts."""
    if not counts:
        raise FFSplitError("coverage_summary: no layers counted")
    rows = [{"layer": i, **counts[i].to_dict()} for i in sorted(counts)]
    mean = _mean_of_numbers(rows)
    mean.pop("layer", None)
    return {"layers": rows, "mean": mean}


def heavy_sets(stats: ModelStats, downs: Mapping[int, Tensor], ratio: float) -> dict[int, Tensor]:
    """Score-based heavy set of every profiled layer (selection.score_order)."""
    layers = _check_downs(stats, downs)
    return {
        i: score_order(neuron_scores(stats.layers[i], downs[i]).cpu(), ratio)[0] for i in layers
    }


def merge_coverage(parts: Iterable[Mapping[int, CoverageCounts]]) -> dict[int, CoverageCounts]:
    """Per-layer merge of coverage counts from several shards."""
    out: dict[int, CoverageCounts] = {}
    for part in parts:
        for i, c in part.items():
            out[i] = c if i not in out else out[i].merged(c)
    return out
