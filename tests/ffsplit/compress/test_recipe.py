"""Recipes on tiny models: budgets met exactly as reported, baselines behave, errors are clear."""

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.outliers import outlier_columns, outlier_count
from ffsplit.compress.recipe import check_budget, compress_model
from ffsplit.config import ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model
from ffsplit.split import ColumnOutlierLinear, ffn_modules
from ffsplit.split.parts import to_storage

CONFIG = ProfileConfig(tokens=128, window=16, batch_size=4, hit_top_fraction=0.05)
IDS = torch.randint(0, 150, (8, 16), generator=torch.Generator().manual_seed(0))
TWO_LEVEL = QuantConfig(group_size=32, allocation="two-level")


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS[:2]).logits


def _compressed(architecture, recipe):
    model, _ = tiny_model(architecture)
    stats = profile_model(model, IDS, CONFIG)
    reference = _logits(model)
    report, _ = compress_model(model, stats, recipe)
    return model, report, reference


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3),
        Recipe(method="lowrank", ffn_reduction=0.3, selection="none"),
        Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3, selection="random"),
        Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.6),
        Recipe(method=QuantConfig(heavy_bits=8, group_size=32), ffn_reduction=0.75),
        Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.5),
        Recipe(
            method=TWO_LEVEL.replace(heavy_bits=8, gptq=False), heavy_ratio=0.1, ffn_reduction=0.6
        ),
        Recipe(method=TWO_LEVEL, selection="none", ffn_reduction=0.7),
        Recipe(method=TWO_LEVEL, heavy_ratio=0.05, ffn_reduction=0.7, selection="random"),
        Recipe(method=TWO_LEVEL, heavy_ratio=0.05, ffn_reduction=0.7, selection="outlier"),
        Recipe(method=TWO_LEVEL, ffn_reduction=0.6, selection="outlier"),
        Recipe(method="prune", ffn_reduction=0.3),
    ],
    ids=lambda r: r.label,
)
def test_budget_met_and_reported_exactly(architecture, recipe):
    model, report, reference = _compressed(architecture, recipe)
    adapter = get_adapter(model)
    measured = sum(m.nbytes() for m in ffn_modules(model, adapter))
    assert measured == report.ffn_bytes
    assert report.ffn_reduction >= recipe.ffn_reduction
    assert report.ffn_reduction < recipe.ffn_reduction + 0.1  # tight, not wildly over
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    assert logits.shape == reference.shape


def test_identity_recipe_is_exact():
    model, report, reference = _compressed(
        "LlamaForCausalLM", Recipe(method="none", heavy_ratio=0.2, ffn_reduction=0.0)
    )
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)
    assert report.ffn_reduction == 0


def test_impossible_budget_is_refused():
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, IDS, CONFIG)
    with pytest.raises(FFSplitError, match="cannot be met"):
        compress_model(model, stats, Recipe(method="lowrank", heavy_ratio=0.9, ffn_reduction=0.5))


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(method="lowrank", heavy_ratio=0.9, ffn_reduction=0.5),
        Recipe(method=QuantConfig(group_size=32, ladder=(4, 3)), ffn_reduction=0.95),
        Recipe(method=TWO_LEVEL, selection="none", ffn_reduction=0.99),
        Recipe(method="prune", ffn_reduction=0.9999),
    ],
    ids=lambda r: r.label,
)
def test_impossible_budget_is_refused_from_shapes_before_any_statistics(recipe):
    model, _ = tiny_model("LlamaForCausalLM")
    with pytest.raises(FFSplitError, match="cannot be met"):
        check_budget(model, recipe)


def test_a_budget_the_planners_meet_passes_the_check():
    model, _ = tiny_model("LlamaForCausalLM")
    for recipe in (
        Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.8),
        Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.7),
        Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.5),
        Recipe(method="prune", ffn_reduction=0.5),
    ):
        check_budget(model, recipe)


def test_statistics_required_for_score_selection():
    model, _ = tiny_model("LlamaForCausalLM")
    with pytest.raises(FFSplitError, match="statistics"):
        compress_model(model, None, Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3))


def test_heavy_neurons_are_the_top_scores():
    model, _ = tiny_model("OPTForCausalLM")
    stats = profile_model(model, IDS, CONFIG)
    adapter = get_adapter(model)
    down = adapter.weights(model, adapter.ffns(model)[0]).down
    _, results = compress_model(
        model, stats, Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    )
    from ffsplit.selection import neuron_scores

    scores = neuron_scores(stats.layers[0], down)
    heavy = results[0].heavy_neurons
    assert (
        scores[heavy].min()
        >= scores[
            torch.tensor([i for i in range(scores.numel()) if i not in set(heavy.tolist())])
        ].max()
    )


def _error(logits, reference):
    return float((logits - reference).pow(2).sum() / reference.pow(2).sum())


def test_quant_allocation_sizes_its_heavy_set_and_beats_uniform_at_equal_bytes():
    """The default quant recipe (widths per neuron from the statistics) is at least as close to
    the dense model as the uniform baseline (same GPTQ, no split) at the same budget."""
    allocated, report, reference = _compressed(
        "LlamaForCausalLM", Recipe(method=QuantConfig(group_size=32), ffn_reduction=0.7)
    )
    uniform, uniform_report, _ = _compressed(
        "LlamaForCausalLM", Recipe(method=TWO_LEVEL, selection="none", ffn_reduction=0.7)
    )
    assert abs(report.ffn_reduction - uniform_report.ffn_reduction) < 0.01
    for layer in report.layers:
        assert layer.heavy + sum(layer.bits.values()) == layer.neurons
        assert all(b < 16 for b in layer.bits)
    assert _error(_logits(allocated), reference) < _error(_logits(uniform), reference)


def test_quant_allocation_refuses_a_budget_below_its_lowest_width():
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, IDS, CONFIG)
    recipe = Recipe(method=QuantConfig(group_size=32, ladder=(4, 3)), ffn_reduction=0.95)
    with pytest.raises(FFSplitError, match="layer 0: allocate: the budget"):
        compress_model(model, stats, recipe)


@pytest.mark.parametrize("gptq", [False, True], ids=["rtn", "gptq"])
def test_outlier_baseline_keeps_the_highest_energy_columns_in_bf16(gptq):
    """Selection 'outlier': up/gate keep the input columns of largest diag(gram_in), down the
    neurons of largest diag(gram_hidden), as bf16 values (round to nearest: the weights' own; GPTQ:
    the compensated ones), every row quantized around them."""
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, IDS, CONFIG)
    adapter = get_adapter(model)
    handle = adapter.ffns(model)[0]
    dense = adapter.weights(model, handle)
    up, gate, down = (t.detach().clone() for t in (dense.up, dense.gate, dense.down))
    config = TWO_LEVEL.replace(gptq=gptq, gptq_down=gptq)
    recipe = Recipe(method=config, selection="outlier", heavy_ratio=0.05, ffn_reduction=0.7)
    _, results = compress_model(model, stats, recipe)
    result, (m, d) = results[0], up.shape
    kept_in = outlier_columns(stats.layers[0].gram_in, outlier_count(d, 0.05))
    kept_down = outlier_columns(stats.layers[0].gram_hidden, outlier_count(m, 0.05))
    assert kept_in.numel() == 2 and kept_down.numel() == 5
    assert sorted(result.heavy_neurons.tolist()) == sorted(kept_down.tolist())
    assert result.report.heavy == 5 and sum(result.report.bits.values()) == m
    up_split, gate_split, down_split = result.modules
    for projection in (up_split, gate_split):
        assert all(isinstance(p, ColumnOutlierLinear) for p in projection.parts)
        assert all(p.kept.tolist() == kept_in.tolist() for p in projection.parts)
    order = result.order
    heavy_at = torch.tensor(
        [i for i, n in enumerate(order.tolist()) if n in set(kept_down.tolist())]
    )
    for split, original in ((up_split, up), (gate_split, gate)):
        columns = split.dense_weight()[:, kept_in]
        assert torch.equal(columns, to_storage(columns))  # stored bf16, codes unused
        if not gptq:
            assert torch.equal(columns, to_storage(original[order][:, kept_in]))
    kept_down_columns = down_split.dense_weight()[:, heavy_at]
    assert torch.equal(kept_down_columns, to_storage(kept_down_columns))
    if not gptq:
        assert torch.equal(kept_down_columns, to_storage(down[:, order[heavy_at]]))


def test_outlier_baseline_needs_gram_matrices():
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, IDS, CONFIG.replace(collect_grams=False))
    plain = TWO_LEVEL.replace(gptq=False, gptq_down=False)
    recipe = Recipe(method=plain, selection="outlier", ffn_reduction=0.7)
    with pytest.raises(FFSplitError, match="layer 0: selection 'outlier' picks columns by their"):
        compress_model(model, stats, recipe)
