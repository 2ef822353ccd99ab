"""Recipes say what they are: a typed method config, an explicit selection, one place for every
rule; version-1 dicts (heavy_ratio 0 = uniform, every method's settings riding along) migrate."""

from __future__ import annotations

import pytest

from ffsplit.config import (
    DEFAULT_HEAVY_RATIO,
    DEFAULT_OUTLIER_RATIO,
    METHOD_CONFIGS,
    EvalConfig,
    LowRankConfig,
    ProfileConfig,
    PruneConfig,
    QuantConfig,
    Recipe,
    SplitOnlyConfig,
)
from ffsplit.errors import FFSplitError

V1 = {"version": 1, "ffn_reduction": 0.3, "seed": 0, "lowrank": {"whiten": True, "damp": 0.01}}
V1_QUANT = {"heavy_bits": 16, "ladder": [8, 4, 3, 2], "group_size": 64, "gptq": False}
TWO_LEVEL = QuantConfig(allocation="two-level")


@pytest.mark.parametrize(
    ("old", "label", "series", "baseline"),
    [
        ({"method": "lowrank", "heavy_ratio": 0.1}, "lowrank-h0.10-r0.3", "ffsplit-lowrank", None),
        (
            {"method": "lowrank", "heavy_ratio": 0.0},
            "lowrank-uniform-r0.3",
            "uniform-lowrank",
            "uniform",
        ),
        ({"method": "quant", "heavy_ratio": 0.0}, "quant-uniform-r0.3", "uniform-quant", "uniform"),
        (
            {"method": "quant", "heavy_ratio": 0.1, "selection": "random"},
            "quant-random-h0.10-r0.3",
            "random-quant",
            "random",
        ),
        ({"method": "prune", "heavy_ratio": 0.1}, "prune-r0.3", "prune", "prune"),
        ({"method": "prune", "heavy_ratio": 0.0}, "prune-r0.3", "prune", "prune"),
        (
            {"method": "prune", "heavy_ratio": 0.1, "selection": "random"},
            "prune-random-r0.3",
            "prune-random",
            "prune",
        ),
        ({"method": "none", "heavy_ratio": 0.0, "ffn_reduction": 0.0}, "dense", "dense", None),
        (
            {"method": "none", "heavy_ratio": 0.2, "ffn_reduction": 0.0},
            "split-h0.20",
            "split",
            None,
        ),
    ],
)
def test_version_1_recipes_migrate_to_what_they_were(
    old: dict, label: str, series: str, baseline: str | None
) -> None:
    recipe = Recipe.from_dict({**V1, "quant": V1_QUANT, **old})
    assert (recipe.label, recipe.series, recipe.baseline) == (label, series, baseline)
    assert recipe.version == 3 and Recipe.from_dict(recipe.to_dict()) == recipe
    assert type(recipe.method) is METHOD_CONFIGS[old["method"]]
    others = {"lowrank", "quant"} - {old["method"]}
    assert not others & set(recipe.to_dict())  # only the method's own settings are kept


def test_the_same_pruned_model_is_one_recipe_and_one_key() -> None:
    """The CLI kept heavy_ratio 0.1 for pruning, the sweep 0.0: two dicts, two cache keys."""
    cli = Recipe.from_dict({**V1, "method": "prune", "heavy_ratio": 0.1})
    sweep = Recipe.from_dict({**V1, "method": "prune", "heavy_ratio": 0.0})
    assert cli == sweep == Recipe(method="prune", ffn_reduction=0.3)
    assert cli.key_dict() == sweep.key_dict()


def test_keys_depend_only_on_what_changes_the_artifact() -> None:
    plain = TWO_LEVEL.replace(gptq=False, gptq_down=False)
    rtn = Recipe(method=plain, selection="none", ffn_reduction=0.5)
    assert not rtn.needs_statistics and "profile" not in rtn.key_dict()
    assert rtn.key_dict() == rtn.replace(profile=ProfileConfig(tokens=1024)).key_dict()
    assert rtn.key_dict() == rtn.replace(seed=7).key_dict()  # no random set to seed
    random = Recipe(method=TWO_LEVEL, selection="random", ffn_reduction=0.5)
    assert random.key_dict() != random.replace(seed=7).key_dict()
    scored = Recipe(method="lowrank")
    assert scored.key_dict() != scored.replace(profile=ProfileConfig(tokens=1024)).key_dict()
    assert "heal" not in scored.key_dict() and "quant" not in scored.key_dict()


def test_defaults_and_heavy_ratio_rules() -> None:
    assert Recipe().heavy_ratio == DEFAULT_HEAVY_RATIO and Recipe().label == "lowrank-h0.10-r0.3"
    assert Recipe(method="prune").heavy_ratio is None
    assert Recipe(selection="none").heavy_ratio is None
    with pytest.raises(FFSplitError, match="heavy_ratio must be unset.*pruning"):
        Recipe(method="prune", heavy_ratio=0.1)
    with pytest.raises(FFSplitError, match="heavy_ratio must be unset.*selection 'none'"):
        Recipe(method=TWO_LEVEL, selection="none", heavy_ratio=0.1)
    with pytest.raises(FFSplitError, match=r"heavy_ratio must be in \(0, 1\)"):
        Recipe(method=TWO_LEVEL, heavy_ratio=0.0)
    with pytest.raises(FFSplitError, match="prune keeps neurons in an order"):
        Recipe(method="prune", selection="none")
    with pytest.raises(FFSplitError, match="ffn_reduction must be 0 for method 'none'"):
        Recipe(method=SplitOnlyConfig(), ffn_reduction=0.3)


def test_methods_are_config_types_and_other_methods_settings_are_refused() -> None:
    assert Recipe(method="quant").method == QuantConfig()
    assert isinstance(Recipe(method=PruneConfig()).method, PruneConfig)
    with pytest.raises(FFSplitError, match="recipe.method must be one of"):
        Recipe(method="zip")
    with pytest.raises(FFSplitError, match=r"unknown key\(s\) 'lowrank' \(settings of method"):
        Recipe.from_dict({"method": "quant", "lowrank": {"whiten": False}})
    with pytest.raises(FFSplitError, match="format version 4"):
        Recipe.from_dict({"version": 4, "method": "quant"})


def test_cross_field_rules_live_in_the_recipe() -> None:
    no_grams = ProfileConfig(collect_grams=False)
    with pytest.raises(FFSplitError, match="lowrank.whiten needs Gram matrices"):
        Recipe(method=LowRankConfig(), profile=no_grams)
    with pytest.raises(FFSplitError, match="quant.gptq needs Gram matrices"):
        Recipe(method=TWO_LEVEL.replace(gptq_down=False), profile=no_grams)
    with pytest.raises(
        FFSplitError, match="gptq and quant.gptq_down and quant.allocation 'layer' need"
    ):
        Recipe(method=QuantConfig(), profile=no_grams)
    Recipe(method=TWO_LEVEL.replace(gptq=False, gptq_down=False), profile=no_grams)
    Recipe(method=LowRankConfig(whiten=False), profile=no_grams)  # plain SVD needs none


def test_eval_config_keys_the_workload_only_when_the_race_runs() -> None:
    race, quiet = EvalConfig(), EvalConfig(latency=False)
    assert "repeats" in race.key_dict() and "repeats" not in quiet.key_dict()
    assert quiet.key_dict() == quiet.replace(repeats=9).key_dict()
    with pytest.raises(FFSplitError, match="eval_tokens"):
        EvalConfig(tokens=8, window=512)


def test_quant_layer_allocation_sizes_its_own_heavy_set() -> None:
    """The default quant recipe gives widths by score under the budget: no heavy ratio to set,
    no baseline selection to combine with; two-level takes both."""
    recipe = Recipe(method="quant", ffn_reduction=0.75)
    assert recipe.heavy_ratio is None and recipe.label == "quant-alloc-r0.75"
    assert recipe.method.levels == (16, 8, 6, 5, 4, 3, 2)
    assert QuantConfig(heavy_bits=8).levels == (8, 6, 5, 4, 3, 2)
    with pytest.raises(FFSplitError, match="heavy_ratio must be unset.*allocation 'two-level'"):
        Recipe(method="quant", heavy_ratio=0.1)
    for selection in ("random", "none"):
        with pytest.raises(FFSplitError, match="allocation 'layer' gives widths by neuron score"):
            Recipe(method="quant", selection=selection)
    assert Recipe(method=TWO_LEVEL, heavy_ratio=0.01).label == "quant-h0.01-r0.3"
    with pytest.raises(FFSplitError, match="quant.allocation must be one of layer, two-level"):
        QuantConfig(allocation="global")


def test_version_2_quant_recipes_keep_what_they_were_made_with() -> None:
    old = {"version": 2, "method": "quant", "quant": {"heavy_bits": 8}, "heavy_ratio": 0.1}
    recipe = Recipe.from_dict(old)
    assert recipe.method == QuantConfig(
        heavy_bits=8,
        ladder=(8, 4, 3, 2),
        allocation="two-level",
        gptq=False,
        act_order=False,
        gptq_down=False,
    )
    assert recipe.heavy_ratio == 0.1 and recipe.version == 3
    gptq = Recipe.from_dict({**old, "quant": {"gptq": True}})
    assert gptq.method.gptq and not gptq.method.gptq_down


def test_outlier_selection_is_the_column_outlier_baseline() -> None:
    """Selection 'outlier': quant two-level only, heavy_ratio = share of input columns kept bf16
    (DEFAULT_OUTLIER_RATIO when unset), read from the Gram diagonals, deterministic."""
    recipe = Recipe(method=TWO_LEVEL, selection="outlier", ffn_reduction=0.75)
    assert recipe.heavy_ratio == DEFAULT_OUTLIER_RATIO == 0.01
    assert (recipe.label, recipe.series, recipe.baseline) == (
        "quant-outlier-h0.01-r0.75",
        "outlier-quant",
        "outlier",
    )
    assert recipe.needs_grams and recipe.needs_statistics
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.key_dict() == recipe.replace(seed=7).key_dict()  # nothing random to seed
    assert "profile" in recipe.key_dict()
    plain = TWO_LEVEL.replace(gptq=False, gptq_down=False)
    assert Recipe(method=plain, selection="outlier", heavy_ratio=0.05).needs_grams
    for method in ("lowrank", "prune"):
        with pytest.raises(
            FFSplitError,
            match=rf"selection 'outlier' applies to method 'quant' only, got method '{method}': "
            r"set recipe.method 'quant' or another selection \(score, random, none\)",
        ):
            Recipe(method=method, selection="outlier")
    with pytest.raises(FFSplitError, match="allocation 'layer' gives widths by neuron score"):
        Recipe(method="quant", selection="outlier")
    with pytest.raises(FFSplitError, match="quant.heavy_bits 8 does not apply to it"):
        Recipe(method=TWO_LEVEL.replace(heavy_bits=8), selection="outlier")
    with pytest.raises(FFSplitError, match=r"heavy_ratio must be in \(0, 1\)"):
        Recipe(method=TWO_LEVEL, selection="outlier", heavy_ratio=0.0)
    with pytest.raises(FFSplitError, match="selection 'outlier' needs Gram matrices"):
        Recipe(method=plain, selection="outlier", profile=ProfileConfig(collect_grams=False))
