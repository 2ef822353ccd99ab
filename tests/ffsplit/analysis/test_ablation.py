"""Zeroing neurons through hooks equals zeroing their down columns, and leaves no trace."""

import copy

import pytest
import torch
from torch import nn

from ffsplit.adapters import get_adapter
from ffsplit.analysis import (
    ablation,
    ablation_sets,
    count_coverage,
    coverage_summary,
    down_weights,
    heavy_sets,
    zero_neurons,
)
from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.eval import perplexity
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.profiling import profile_model

CONFIG = ProfileConfig(
    tokens=64, window=8, batch_size=4, hit_top_fraction=0.05, collect_grams=False
)
WINDOWS = torch.randint(0, 150, (8, 8), generator=torch.Generator().manual_seed(0))


def _output(model, ids=WINDOWS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _neurons(m, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(m, generator=gen)[:7]


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_hooks_equal_zeroed_down_columns_and_are_removed(architecture):
    model, _ = tiny_model(architecture)
    adapter = get_adapter(model)
    dense = _output(model)
    chosen = {
        h.layer: _neurons(adapter.weights(model, h).neurons, h.layer) for h in adapter.ffns(model)
    }

    reference = copy.deepcopy(model)
    for h in adapter.ffns(reference):
        w = adapter.weights(reference, h)
        down = w.down.clone()
        down[:, chosen[h.layer]] = 0
        linear = nn.Linear(down.shape[1], down.shape[0], bias=w.down_bias is not None)
        linear.weight.data.copy_(down)
        if w.down_bias is not None:
            linear.bias.data.copy_(w.down_bias)
        adapter.replace(
            reference,
            h,
            up=reference.get_submodule(h.up_path),
            gate=reference.get_submodule(h.gate_path) if h.gate_path else None,
            down=linear,
        )
    expected = _output(reference)

    with zero_neurons(model, adapter, chosen):
        ablated = _output(model)
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated, dense)
    assert torch.equal(_output(model), dense)  # hooks gone: exactly dense again


def test_hooks_are_removed_on_error_and_bad_indices_rejected():
    model, _ = tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    dense = _output(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        zero_neurons(model, adapter, {0: torch.arange(5)}),
    ):
        raise RuntimeError("boom")
    assert torch.equal(_output(model), dense)
    with (
        pytest.raises(FFSplitError, match="96 neurons"),
        zero_neurons(model, adapter, {0: torch.tensor([96])}),
    ):
        pass
    with (
        pytest.raises(FFSplitError, match="not FFN layers"),
        zero_neurons(model, adapter, {7: torch.tensor([0])}),
    ):
        pass
    assert torch.equal(_output(model), dense)
    with zero_neurons(model, adapter, {0: torch.tensor([], dtype=torch.long)}):
        assert torch.equal(_output(model), dense)


def _evaluate(model):
    return perplexity(model, WINDOWS, batch_size=4).perplexity


def test_ablation_keys_and_determinism():
    model, _ = tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    stats = profile_model(model, WINDOWS, CONFIG)
    first = ablation(model, adapter, stats, _evaluate, fraction=0.05, seed=3, random_repeats=2)
    assert set(first) >= {
        "fraction",
        "dense",
        "top",
        "bottom",
        "random",
        "random_mean",
        "random_std",
        "seeds",
        "neurons_zeroed_per_layer",
        "layers",
    }
    assert first["seeds"] == [3, 4]
    assert len(first["random"]) == 2
    assert first["neurons_zeroed_per_layer"] == {"0": 5, "1": 5}  # ceil(5% of 96)
    assert first["dense"] == pytest.approx(_evaluate(model))
    assert first["random_mean"] == pytest.approx(sum(first["random"]) / 2)
    for key in ("top", "bottom", *range(2)):
        value = first[key] if isinstance(key, str) else first["random"][key]
        assert value != first["dense"]
    again = ablation(model, adapter, stats, _evaluate, fraction=0.05, seed=3, random_repeats=2)
    assert again == first
    other = ablation(
        model,
        adapter,
        stats,
        _evaluate,
        fraction=0.05,
        seed=4,
        random_repeats=2,
        bottom=False,
        metric="perplexity",
        higher_is_better=False,
    )
    assert "bottom" not in other and "metric" not in first
    assert (other["metric"], other["higher_is_better"]) == ("perplexity", False)
    assert other["random"][0] == first["random"][1]  # seed 4 is the same random set either way
    assert _evaluate(model) == first["dense"]  # the model is dense again


def test_ablation_sets_follow_the_scores():
    model, _ = tiny_model("BertModel")
    adapter = get_adapter(model)
    stats = profile_model(model, WINDOWS, CONFIG)
    downs = down_weights(model)
    assert sorted(downs) == [0, 1] and downs[0].shape == (32, 96)
    sets = ablation_sets(model, adapter, stats, fraction=0.05, seed=0, random_repeats=3)
    expected = heavy_sets(stats, downs, 0.05)
    for layer in stats.layers:
        assert torch.equal(sets["top"][layer], expected[layer])
        assert not set(sets["top"][layer].tolist()) & set(sets["bottom"][layer].tolist())
        assert [r[layer].numel() for r in sets["random"]] == [5, 5, 5]
    assert not torch.equal(sets["random"][0][0], sets["random"][1][0])
    with pytest.raises(FFSplitError, match="fraction"):
        ablation_sets(model, adapter, stats, fraction=1.0)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "BertModel"])
def test_coverage_slots_agree_with_profiled_hits(architecture):
    model, _ = tiny_model(architecture)
    adapter = get_adapter(model)
    stats = profile_model(model, WINDOWS, CONFIG)
    downs = {h.layer: adapter.weights(model, h).down for h in adapter.ffns(model)}
    heavy = heavy_sets(stats, downs, 0.05)
    k = {i: s.hit_top_k for i, s in stats.layers.items()}
    with count_coverage(model, adapter, heavy, k) as counts, torch.no_grad():
        model(input_ids=WINDOWS)
    for layer, c in counts.items():
        # the same top-k as the profiler: heavy slots = the heavy neurons' hits
        assert c.tokens == stats.layers[layer].tokens
        assert c.heavy_slots == int(stats.layers[layer].hits[heavy[layer]].sum())
        assert c.top1_heavy <= c.covered <= c.tokens
    summary = coverage_summary(counts)
    assert all(0 <= row["covered_rate"] <= 1 for row in summary["layers"])
    before = dict(counts)
    with torch.no_grad():
        model(input_ids=WINDOWS)  # hooks removed: nothing more is counted
    assert counts == before
