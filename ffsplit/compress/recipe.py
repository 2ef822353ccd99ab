"""Apply a recipe to FFNs: order neurons, solve the budget, compress blocks, swap split modules.

The one path every caller takes (the CLI's job, the pipeline's compress and assemble tasks, the
benchmarks): `compress_layers` compresses a set of FFN layers of a model without touching it
(so layer shards are independent work for any worker), `apply_layers` swaps their split modules
into a model and builds the report; `compress_model` is the two in a row. `compress_layer` is a
function of one FFN's weights and statistics. Compressors register against their method config
type (PLANNERS), as torchao binds configs to handlers.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNWeights, get_adapter
from ffsplit.compress.allocation import allocate, neuron_part_costs
from ffsplit.compress.budget import (
    DENSE_BITS,
    FFNShape,
    dense_ffn_bytes,
    max_bytes,
    solve_kept_neurons,
    solve_light_bits,
    solve_rank,
)
from ffsplit.compress.lowrank import svd_factors, whitened_svd
from ffsplit.compress.plans import (
    NeuronPlan,
    RowQuantizer,
    column_outlier_layer,
    plan_blocks,
    two_level_plan,
)
from ffsplit.compress.results import CompressedLayer, CompressionReport, LayerReport
from ffsplit.config import (
    LowRankConfig,
    MethodConfig,
    PruneConfig,
    QuantConfig,
    Recipe,
    SplitOnlyConfig,
)
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats, ModelStats
from ffsplit.selection import heavy_count, neuron_scores, order_by_score, random_order
from ffsplit.split.apply import BlockParts, build_split, dense_block, swap_ffn
from ffsplit.split.parts import LowRankLinear, to_storage
from ffsplit.split.qformat import pick_group_size


def neuron_order(
    weights: FFNWeights, stats: LayerStats | None, recipe: Recipe, layer: int
) -> tuple[Tensor, Tensor]:
    """(heavy, light) neuron indices; light in the order compressors hand out resources.

    Score selection: both by descending score. Random split: random order. No split (uniform)
    and the column-outlier baseline: light in index order, since these baselines have no score to
    go by (the column-outlier planner then picks the neurons whose down column stays bf16).
    """
    m = weights.neurons
    if recipe.selection == "random":
        return random_order(m, recipe.heavy, recipe.seed, layer)
    if recipe.selection in ("none", "outlier"):
        return torch.empty(0, dtype=torch.long), torch.arange(m)
    if stats is None:
        raise FFSplitError(f"layer {layer}: score selection needs profiling statistics")
    order = order_by_score(neuron_scores(stats, weights.down)).cpu()
    k = heavy_count(m, recipe.heavy)
    return order[:k], order[k:]


def _light_gram(
    stats: LayerStats | None, which: str, neurons: Tensor | None = None
) -> Tensor | None:
    if stats is None:
        return None
    gram = stats.gram_in if which == "in" else stats.gram_hidden
    if gram is None:
        return None
    if neurons is not None:
        idx = neurons.to(gram.device)
        gram = gram.index_select(0, idx).index_select(1, idx)
    return gram


def _lowrank_block(
    rank: int, stats: LayerStats | None, config: LowRankConfig, notes: list[str]
) -> Callable[[FFNWeights, Tensor], BlockParts]:
    def factor(weight: Tensor, gram: Tensor | None, bias: Tensor | None) -> LowRankLinear:
        r = min(rank, *weight.shape)
        if config.whiten:
            if gram is None or stats is None:
                raise FFSplitError(
                    "activation-aware low-rank needs Gram matrices: profile with collect_grams=true"
                )
            result = whitened_svd(weight, r, gram.to(weight.device), stats.tokens, config.damp)
            if result.fallback:
                notes.append(f"plain SVD fallback: {result.fallback}")
            a, b = result.a, result.b
        else:
            a, b = svd_factors(weight, r)
        dtype = weight.dtype
        return LowRankLinear(to_storage(a.to(dtype)), to_storage(b.to(dtype)), bias)

    def compress(block: FFNWeights, neurons: Tensor) -> BlockParts:
        gram_in = _light_gram(stats, "in")
        gram_hidden = _light_gram(stats, "hidden", neurons)
        up = factor(block.up, gram_in, block.up_bias)
        gate = None if block.gate is None else factor(block.gate, gram_in, block.gate_bias)
        down = factor(block.down, gram_hidden, None)
        return BlockParts(up, gate, down)

    return compress


Block = tuple[Tensor, Callable[[FFNWeights, Tensor], BlockParts]]


@dataclass
class LayerPlan:
    """What a planner decides from: the FFN's shape, its neurons in order (heavy, then light in
    the order compressors hand out resources), its statistics, the recipe, the report it fills
    in (rank, bits, kept neurons, notes) and the FFN's weights. A planner that sizes the heavy
    set itself (the quant layer allocation) sets ``heavy`` and ``light``."""

    shape: FFNShape
    heavy: Tensor
    light: Tensor
    stats: LayerStats | None
    recipe: Recipe
    report: LayerReport
    weights: FFNWeights


Planner = Callable[[LayerPlan], list[Block]]

# Compressors register against their method config type (style.md 5): one planner per type.
PLANNERS: dict[type[MethodConfig], Planner] = {}


def planner(config_type: type[MethodConfig]) -> Callable[[Planner], Planner]:
    """Register the planner of a method config type."""

    def register(fn: Planner) -> Planner:
        PLANNERS[config_type] = fn
        return fn

    return register


@planner(SplitOnlyConfig)
def _plan_none(layer: LayerPlan) -> list[Block]:
    """Identity compressor: the split alone (its exactness is a tested invariant)."""
    return [(layer.heavy, dense_block), (layer.light, dense_block)]


@planner(PruneConfig)
def _plan_prune(layer: LayerPlan) -> list[Block]:
    """Keep the first neurons of the order (score, or random) that fit the budget, drop the rest."""
    kept = solve_kept_neurons(layer.shape, layer.recipe.ffn_reduction)
    layer.report.kept = kept
    layer.report.heavy = min(layer.report.heavy, kept)
    return [(torch.cat([layer.heavy, layer.light])[:kept], dense_block)]


@planner(LowRankConfig)
def _plan_lowrank(layer: LayerPlan) -> list[Block]:
    """Heavy dense; each light matrix factored to the largest rank the budget allows."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rank = solve_rank(layer.shape, int(layer.heavy.numel()), layer.recipe.ffn_reduction)
    layer.report.notes.extend(str(w.message) for w in caught)
    layer.report.rank = rank
    blocks: list[Block] = [(layer.heavy, dense_block)]
    if rank > 0:  # rank 0: the budget leaves nothing for the light part, which is dropped
        config: LowRankConfig = layer.recipe.method  # type: ignore[assignment]
        blocks.append((layer.light, _lowrank_block(rank, layer.stats, config, layer.report.notes)))
    return blocks


@planner(QuantConfig)
def _plan_quant(layer: LayerPlan) -> list[Block]:
    """A width per neuron (the layer allocation, or heavy at heavy_bits and the light neurons in
    order over two adjacent widths of the ladder), then each block by GPTQ or to nearest."""
    config: QuantConfig = layer.recipe.method  # type: ignore[assignment]
    group = pick_group_size(layer.shape.d, preferred=config.group_size)
    if layer.recipe.selection == "outlier":
        return _plan_column_outlier(layer, config, group)
    order = torch.cat([layer.heavy, layer.light])
    if config.allocation == "layer":
        plan = _allocated_plan(layer, config, group, order)
        top = plan.up_gate[order] == config.levels[0]
        layer.heavy, layer.light = order[top], order[~top]
        widths = Counter(plan.up_gate[layer.light].tolist())
        layer.report.bits = {b: widths[b] for b in sorted(widths, reverse=True)}
        layer.report.heavy = int(layer.heavy.numel())
    else:
        heavy = int(layer.heavy.numel())
        counts = solve_light_bits(
            layer.shape, heavy, config.heavy_bits, layer.recipe.ffn_reduction, group, config.ladder
        )
        layer.report.bits = counts
        plan = two_level_plan(order, heavy, config.heavy_bits, counts)
    stats = layer.stats
    gram_in = None if stats is None or not config.gptq else stats.gram_in
    if config.gptq and gram_in is None:
        raise FFSplitError("quant.gptq needs statistics with Gram matrices (collect_grams)")
    rows = RowQuantizer(layer.weights, group, gram_in, act_order=config.act_order)
    return plan_blocks(
        layer.weights,
        plan,
        group,
        stats,
        gptq=config.gptq_down,
        act_order=config.act_order,
        rows=rows,
    )


def _plan_column_outlier(layer: LayerPlan, config: QuantConfig, group: int) -> list[Block]:
    """The column-outlier baseline (outliers.py) at the two-level budget rule: up/gate keep the
    heavy_ratio share of input columns of largest ``diag(gram_in)`` in bf16 (last in GPTQ, so they
    absorb its error), down the share of neurons of largest ``diag(gram_hidden)``; every other
    vector over two adjacent widths of the ladder in index order, the most bytes that still meet
    the budget. The kept down neurons are the layer's heavy set."""
    stats, where = layer.stats, f"layer {layer.report.layer}"
    if stats is None or stats.gram_in is None or stats.gram_hidden is None:
        raise FFSplitError(
            f"{where}: selection 'outlier' picks columns by their Gram diagonals; the statistics "
            "have no Gram matrices (profile with collect_grams)"
        )
    recipe = layer.recipe
    try:
        outlier = column_outlier_layer(
            layer.shape,
            stats.gram_in,
            stats.gram_hidden,
            recipe.heavy,
            recipe.ffn_reduction,
            group,
            config.ladder,
        )
    except FFSplitError as exc:
        raise FFSplitError(f"{where}: {exc}") from None
    rest = torch.ones(layer.shape.m, dtype=torch.bool)
    rest[outlier.kept_down] = False
    layer.heavy, layer.light = outlier.kept_down, torch.arange(layer.shape.m)[rest]
    layer.report.heavy = int(outlier.kept_down.numel())
    widths = Counter(outlier.plan.up_gate.tolist())
    layer.report.bits = {b: widths[b] for b in sorted(widths, reverse=True)}
    rows = RowQuantizer(
        layer.weights,
        group,
        stats.gram_in if config.gptq else None,
        act_order=config.act_order,
        kept=outlier.kept_in,
    )
    return plan_blocks(
        layer.weights,
        outlier.plan,
        group,
        stats,
        gptq=config.gptq_down,
        act_order=config.act_order,
        rows=rows,
    )


def _allocated_plan(layer: LayerPlan, config: QuantConfig, group: int, order: Tensor) -> NeuronPlan:
    """Widths from the statistics under the layer's byte budget (allocation.py, joint: one width
    per neuron for its up, gate and down vectors)."""
    if layer.stats is None:
        raise FFSplitError(f"layer {layer.report.layer}: the quant allocation needs statistics")
    shape = layer.shape
    costs = neuron_part_costs(
        layer.weights, layer.stats, layer.report.layer, group, config.levels, joint=True
    )
    budget = max_bytes(dense_ffn_bytes(shape), layer.recipe.ffn_reduction)
    try:
        allocation = allocate(costs, budget - shape.bias_bytes(shape.m))
    except FFSplitError as exc:
        raise FFSplitError(f"layer {layer.report.layer}: {exc}") from None
    (widths,) = allocation.widths
    return NeuronPlan(widths, widths.clone(), order)


def compress_layer(
    weights: FFNWeights, stats: LayerStats | None, recipe: Recipe, layer: int
) -> CompressedLayer:
    """Compress one FFN by the recipe. Pure in the sense of style.md: tensors in, modules out."""
    shape = FFNShape.from_weights(weights)
    if stats is not None and stats.neurons != shape.m:
        raise FFSplitError(
            f"layer {layer}: statistics have {stats.neurons} neurons, the FFN has {shape.m}; "
            "they were collected on another model"
        )
    if stats is not None:
        stats = stats.to_device(weights.up.device)
    heavy, light = neuron_order(weights, stats, recipe, layer)
    report = LayerReport(layer, shape.m, int(heavy.numel()), dense_ffn_bytes(shape), 0)
    planned = LayerPlan(shape, heavy, light, stats, recipe, report, weights)
    blocks = PLANNERS[type(recipe.method)](planned)
    modules = build_split(weights, blocks)
    report.bytes = sum(m.nbytes() for m in modules if m is not None)
    order = torch.cat([b[0] for b in blocks if b[0].numel()])
    return CompressedLayer(layer, modules, planned.heavy.cpu(), order.cpu(), report)


def check_budget(model: nn.Module, recipe: Recipe, adapter: Adapter | None = None) -> None:
    """Refuse a budget that no FFN of the model can meet, from shapes alone: before profiling
    (minutes) rather than after. The same solvers and messages as the planners; the layer
    allocation's floor is every neuron at the ladder's lowest width, the uniform floor. The
    column-outlier baseline is left to its planner (its floor depends on the kept columns)."""
    adapter = adapter or get_adapter(model)
    method, target = recipe.method, recipe.ffn_reduction
    shapes = {FFNShape.from_weights(adapter.weights(model, h)) for h in adapter.ffns(model)}
    for shape in shapes:
        heavy = heavy_count(shape.m, recipe.heavy)
        if isinstance(method, PruneConfig):
            solve_kept_neurons(shape, target)
        elif isinstance(method, LowRankConfig):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                solve_rank(shape, heavy, target)
        elif isinstance(method, QuantConfig) and recipe.selection != "outlier":
            group = pick_group_size(shape.d, preferred=method.group_size)
            if method.allocation == "layer":
                heavy, bits = 0, DENSE_BITS
            else:
                bits = method.heavy_bits
            solve_light_bits(shape, heavy, bits, target, group, method.ladder)


def compress_layers(
    model: nn.Module,
    stats: ModelStats | None,
    recipe: Recipe,
    layers: Sequence[int] | None = None,
    *,
    adapter: Adapter | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, CompressedLayer]:
    """Compress FFN `layers` (every FFN by default) of `model` by the recipe; the model is only
    read, so shards of layers can be compressed by any worker holding the base model."""
    adapter = adapter or get_adapter(model)
    if recipe.needs_statistics and stats is None:
        raise FFSplitError(
            f"recipe '{recipe.label}' needs calibration statistics: run `ffsplit profile` first "
            "or pass --calib-tokens"
        )
    handles = {h.layer: h for h in adapter.ffns(model)}
    wanted = sorted(handles) if layers is None else list(layers)
    unknown = [layer for layer in wanted if layer not in handles]
    if unknown:
        raise FFSplitError(
            f"the model has no FFN layer {', '.join(map(str, unknown))} "
            f"(it has 0..{len(handles) - 1})"
        )
    if stats is not None:
        missing = [layer for layer in wanted if layer not in stats.layers]
        if missing:
            raise FFSplitError(
                f"statistics lack layers {missing}: they cover {sorted(stats.layers)}"
            )
    results: dict[int, CompressedLayer] = {}
    for done, layer in enumerate(wanted, 1):
        weights = adapter.weights(model, handles[layer])
        layer_stats = None if stats is None else stats.layers[layer]
        results[layer] = compress_layer(weights, layer_stats, recipe, layer)
        if progress is not None:
            progress(done, len(wanted))
    return results


def apply_layers(
    model: nn.Module,
    results: Mapping[int, CompressedLayer],
    recipe: Recipe,
    *,
    adapter: Adapter | None = None,
    seconds: float = 0.0,
    every_layer: bool = True,
) -> CompressionReport:
    """Swap each result's split modules into `model` (in place) and build the whole report.

    every_layer: every FFN of the model must have a result (a variant is never partly compressed).
    """
    adapter = adapter or get_adapter(model)
    handles = {h.layer: h for h in adapter.ffns(model)}
    unknown = sorted(set(results) - set(handles))
    if unknown:
        raise FFSplitError(f"the model has no FFN layer(s) {unknown}; results of another model?")
    missing = sorted(set(handles) - set(results))
    if every_layer and missing:
        raise FFSplitError(f"no shard holds layers {missing}; every FFN needs one")
    for layer in sorted(results):
        swap_ffn(model, adapter, handles[layer], results[layer].modules)
    return CompressionReport.of(
        recipe.to_dict(), [results[i].report for i in sorted(results)], seconds
    )


def compress_model(
    model: nn.Module,
    stats: ModelStats | None,
    recipe: Recipe,
    *,
    adapter: Adapter | None = None,
    layers: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CompressionReport, dict[int, CompressedLayer]]:
    """Compress every FFN (or `layers`) of `model` in place; the report and per-layer results."""
    adapter = adapter or get_adapter(model)
    started = time.perf_counter()
    results = compress_layers(model, stats, recipe, layers, adapter=adapter, progress=progress)
    report = apply_layers(
        model,
        results,
        recipe,
        adapter=adapter,
        seconds=time.perf_counter() - started,
        every_layer=layers is None,
    )
    return report, results
