"""The observation's measures: concentration, hit frequency, heavy-set stability, coverage."""

import itertools
import math

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.analysis import (
    CoverageCounts,
    coverage_counts,
    coverage_summary,
    expected_random_jaccard,
    gini,
    heavy_set_stability,
    layer_observation,
    merge_coverage,
    model_observation,
)
from ffsplit.analysis.observation import fraction_for_share, spearman
from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model
from ffsplit.profiling.stats import LayerStats, ModelStats

CONFIG = ProfileConfig(
    tokens=64, window=8, batch_size=4, hit_top_fraction=0.05, collect_grams=False
)


def _windows(seed=0, n=8, t=8):
    return torch.randint(0, 150, (n, t), generator=torch.Generator().manual_seed(seed))


def _stats(sum_sq, hits=None, tokens=10, k=1):
    sum_sq = torch.as_tensor(sum_sq, dtype=torch.float64)
    m = sum_sq.numel()
    if hits is None:
        hits = torch.zeros(m, dtype=torch.int64)
    return LayerStats(
        tokens=tokens,
        sum_sq=sum_sq,
        max_abs=sum_sq.sqrt(),
        hits=torch.as_tensor(hits, dtype=torch.int64),
        hit_top_k=k,
    )


def _profiled(architecture, seed=0):
    model, _ = tiny_model(architecture)
    adapter = get_adapter(model)
    stats = profile_model(model, _windows(seed), CONFIG)
    downs = {h.layer: adapter.weights(model, h).down for h in adapter.ffns(model)}
    return model, adapter, stats, downs


def test_gini_bounds():
    assert gini(torch.ones(50)) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(50)
    one_hot[7] = 3.0
    assert gini(one_hot) == pytest.approx(49 / 50)
    assert gini(torch.zeros(4)) == 0.0
    assert 0 < gini(torch.arange(1.0, 11.0)) < gini(torch.arange(1.0, 11.0) ** 4)
    with pytest.raises(FFSplitError):
        gini(torch.tensor([1.0, -1.0]))


def test_fraction_for_share():
    assert fraction_for_share(torch.ones(10), 0.5) == pytest.approx(0.5)
    assert fraction_for_share(torch.tensor([9.0, 1.0, 0.0, 0.0]), 0.5) == pytest.approx(0.25)
    assert fraction_for_share(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == pytest.approx(1.0)


def test_shares_of_a_known_layer():
    # 200 neurons: neuron 0 carries energy 100, neurons 1..9 carry 10 each, the rest 1 each.
    energy = torch.ones(200, dtype=torch.float64)
    energy[0] = 100.0
    energy[1:10] = 10.0
    down = torch.zeros(4, 200)
    down[0] = 1.0  # unit column norms: score^2 = sum_sq
    obs = layer_observation(_stats(energy), down, heavy_ratio=0.01)
    total = 100 + 90 + 190
    assert obs["top1_share"] == pytest.approx((100 + 10) / total)  # ceil(1% of 200) = 2 neurons
    assert obs["top5_share"] == pytest.approx((100 + 90) / total)  # 10 neurons
    assert obs["top10_share"] == pytest.approx((100 + 90 + 10) / total)  # 20 neurons
    linear_total = 10 + 9 * math.sqrt(10) + 190
    assert obs["top1_share_linear"] == pytest.approx((10 + math.sqrt(10)) / linear_total)
    assert obs["heavy_neurons"] == 2
    assert obs["neurons"] == 200


def test_uniform_layer_gives_uniform_shares():
    obs = layer_observation(_stats(torch.ones(300)), torch.ones(3, 300), heavy_ratio=0.05)
    assert obs["top1_share"] == pytest.approx(3 / 300)
    assert obs["top5_share"] == pytest.approx(15 / 300)
    assert obs["top10_share"] == pytest.approx(30 / 300)
    assert obs["score_gini"] == pytest.approx(0.0, abs=1e-12)
    assert obs["neurons_for_half_energy"] == pytest.approx(0.5)


def test_hit_frequency_against_uniform():
    # 100 neurons, k = 2, 50 tokens: 100 top-k slots. Heavy (top 2% by score) = neurons 0, 1.
    sum_sq = torch.linspace(2.0, 1.0, 100)
    hits = torch.zeros(100, dtype=torch.int64)
    hits[0], hits[1] = 40, 30  # neuron 0 in 40 tokens' top-2, neuron 1 in 30
    hits[2:32] = 1  # the remaining 30 slots spread thinly
    obs = layer_observation(_stats(sum_sq, hits, tokens=50, k=2), torch.ones(1, 100), 0.02)
    assert obs["heavy_hit_rate"] == pytest.approx((40 + 30) / 2 / 50)
    assert obs["uniform_hit_rate"] == pytest.approx(2 / 100)
    assert obs["hit_lift"] == pytest.approx(0.7 / 0.02)
    assert obs["heavy_slot_share"] == pytest.approx(70 / 100)
    assert obs["uniform_slot_share"] == pytest.approx(2 / 100)


def test_layer_observation_rejects_bad_input():
    with pytest.raises(FFSplitError, match="another model"):
        layer_observation(_stats(torch.ones(10)), torch.ones(3, 11))
    with pytest.raises(FFSplitError, match="heavy_ratio"):
        layer_observation(_stats(torch.ones(10)), torch.ones(3, 10), heavy_ratio=0.0)
    with pytest.raises(FFSplitError, match="no tokens"):
        layer_observation(_stats(torch.ones(10), tokens=0), torch.ones(3, 10))


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "BertModel", "GPT2LMHeadModel"])
def test_model_observation_on_a_profiled_model(architecture):
    _, _, stats, downs = _profiled(architecture)
    result = model_observation(stats, downs, heavy_ratio=0.05)
    assert [row["layer"] for row in result["layers"]] == sorted(stats.layers)
    for row in result["layers"]:
        assert 0 < row["top1_share"] <= row["top5_share"] <= row["top10_share"] <= 1
        assert 0 < row["top1_share_linear"] <= row["top5_share_linear"] <= row["top10_share_linear"]
        # the top-scoring neurons hold at least their uniform share
        assert row["top10_share"] >= 0.1 - 1e-12
        assert 0 <= row["heavy_slot_share"] <= 1
        assert 0 <= row["score_gini"] < 1
    assert result["mean"]["top1_share"] == pytest.approx(
        sum(r["top1_share"] for r in result["layers"]) / len(result["layers"])
    )
    with pytest.raises(FFSplitError, match="no down projection"):
        model_observation(stats, {0: downs[0]})


def test_expected_random_jaccard_matches_enumeration():
    m, size = 7, 3
    subsets = list(itertools.combinations(range(m), size))
    brute = (
        sum(len(set(a) & set(b)) / len(set(a) | set(b)) for a in subsets for b in subsets)
        / len(subsets) ** 2
    )
    assert expected_random_jaccard(m, size) == pytest.approx(brute, rel=1e-12)
    assert expected_random_jaccard(10, 10) == pytest.approx(1.0)
    # large layers stay finite (log-space sums): about size / (2 m - size) for small ratios
    assert expected_random_jaccard(3072, 31) == pytest.approx(31 / (2 * 3072 - 31), rel=0.05)


def test_stability_of_identical_and_different_stats():
    _, _, stats, downs = _profiled("LlamaForCausalLM")
    same = heavy_set_stability(stats, stats, downs, ratio=0.05)
    for row in same["layers"]:
        assert row["jaccard"] == 1.0
        assert row["overlap"] == 1.0
        assert row["spearman"] == pytest.approx(1.0)
        assert 0 < row["random_jaccard"] < 0.1
    other = profile_model(tiny_model("LlamaForCausalLM")[0], _windows(seed=5), CONFIG)
    moved = heavy_set_stability(stats, other, downs, ratio=0.05)
    for row in moved["layers"]:
        assert 0 <= row["jaccard"] <= 1
        assert -1 <= row["spearman"] <= 1
    assert moved["mean"]["jaccard"] == pytest.approx(
        sum(r["jaccard"] for r in moved["layers"]) / len(moved["layers"])
    )
    with pytest.raises(FFSplitError, match="different layers"):
        heavy_set_stability(stats, ModelStats({0: stats.layers[0]}), downs)


def test_spearman_of_reversed_scores():
    a = torch.arange(10.0)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_coverage_counts_by_hand():
    # 3 tokens, 4 neurons, unit down norms, heavy = {0}, top-2.
    h = torch.tensor(
        [
            [5.0, 1.0, 0.5, 0.0],  # top-2 {0, 1}: covered, top1 heavy
            [1.0, 3.0, 2.0, 0.0],  # top-2 {1, 2}: not covered
            [2.0, 3.0, 0.0, 1.0],  # top-2 {1, 0}: covered, top1 not heavy
        ]
    )
    c = coverage_counts(h, torch.ones(4), torch.tensor([0]), top_k=2)
    assert (c.tokens, c.covered, c.top1_heavy, c.heavy_slots) == (3, 2, 1, 2)
    d = c.to_dict()
    assert d["covered_rate"] == pytest.approx(2 / 3)
    assert d["random_top1_rate"] == pytest.approx(1 / 4)
    # a random 1-subset of 4 hits a given 2-subset with probability 1/2
    assert d["random_covered_rate"] == pytest.approx(0.5)
    # down norms weigh the activations: neuron 0's tiny output column takes it out of every top-2
    c = coverage_counts(h, torch.tensor([0.01, 1.0, 1.0, 1.0]), torch.tensor([0]), top_k=2)
    assert c.covered == 0
    with pytest.raises(FFSplitError):
        coverage_counts(h, torch.ones(3), torch.tensor([0]), top_k=2)


def test_random_covered_rate_matches_enumeration():
    m, heavy, k = 8, 3, 2
    hit = sum(1 for s in itertools.combinations(range(m), heavy) if set(s) & {0, 1})
    expected = hit / math.comb(m, heavy)
    d = CoverageCounts(neurons=m, heavy=heavy, top_k=k, tokens=1).to_dict()
    assert d["random_covered_rate"] == pytest.approx(expected)


def test_coverage_merge_and_summary():
    a = CoverageCounts(10, 2, 1, tokens=4, covered=2, top1_heavy=2, heavy_slots=2)
    b = CoverageCounts(10, 2, 1, tokens=6, covered=3, top1_heavy=3, heavy_slots=3)
    merged = merge_coverage([{0: a}, {0: b}])
    assert merged[0].tokens == 10 and merged[0].covered == 5
    summary = coverage_summary(merged)
    assert summary["layers"][0]["covered_rate"] == pytest.approx(0.5)
    with pytest.raises(FFSplitError):
        a.merged(CoverageCounts(10, 3, 1))
