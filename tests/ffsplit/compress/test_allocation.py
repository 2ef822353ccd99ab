"""Bit allocation: budgets met exactly, better proxy error than a uniform mix, plans that build."""

from __future__ import annotations

import math

import pytest
import torch

from ffsplit.adapters import FFNWeights
from ffsplit.compress.allocation import (
    PartCosts,
    allocate,
    allocation_plans,
    neuron_part_costs,
    relative_errors,
)
from ffsplit.compress.budget import (
    FFNShape,
    dense_ffn_bytes,
    neuron_plan_bytes,
    solve_light_bits,
    vector_bytes,
)
from ffsplit.compress.plans import build_plan_ffn, two_level_plan
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats

D, M, GROUP = 64, 48, 16


def gated_ffn(seed: int = 0) -> tuple[FFNWeights, LayerStats, torch.Tensor]:
    """A small SwiGLU FFN, its exact statistics on random inputs, and those inputs."""
    g = torch.Generator().manual_seed(seed)
    weights = FFNWeights(
        up=torch.randn(M, D, generator=g) * 0.1,
        gate=torch.randn(M, D, generator=g) * 0.1,
        down=torch.randn(D, M, generator=g) * 0.1,
    )
    x = torch.randn(1024, D, generator=g) * torch.logspace(0.5, -0.5, D)
    hidden = torch.nn.functional.silu(x @ weights.gate.T) * (x @ weights.up.T)
    hidden[:, :3] *= 12  # three heavy hitters
    weights.up[:3] *= 12
    stats = LayerStats(
        tokens=x.shape[0],
        sum_sq=hidden.double().pow(2).sum(0),
        max_abs=hidden.double().abs().amax(0),
        hits=torch.zeros(M, dtype=torch.int64),
        gram_in=x.double().T @ x.double(),
        gram_hidden=hidden.double().T @ hidden.double(),
    )
    return weights, stats, x


def ffn_output(modules: tuple, x: torch.Tensor) -> torch.Tensor:
    up, gate, down = modules
    return down(torch.nn.functional.silu(gate(x)) * up(x))


def dense_output(weights: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    hidden = torch.nn.functional.silu(x @ weights.gate.T) * (x @ weights.up.T)
    return hidden @ weights.down.T


def test_relative_errors_shrink_with_bits_and_use_the_metric() -> None:
    rows = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    errors = relative_errors(rows, (16, 8, 4, 2), 16)
    assert bool((errors[:, :-1] < errors[:, 1:]).all())
    assert float(errors[:, 0].max()) < 1e-4 and float(errors[:, 3].min()) > 1e-3
    # a metric that only sees the first input: error of that column only
    metric = torch.zeros(64, 64)
    metric[0, 0] = 1.0
    seen = relative_errors(rows, (4,), 16, gram=metric)
    from ffsplit.compress.quant import quantize_groups
    from ffsplit.split.qformat import dequantize

    q = dequantize(quantize_groups(rows, 4, 16))
    expected = ((rows[:, 0] - q[:, 0]) ** 2 / rows[:, 0] ** 2).double()
    assert torch.allclose(seen[:, 0], expected, rtol=1e-5)


def costs_of(errors: list[list[float]], nbytes: list[int], levels=(8, 4, 2)) -> PartCosts:
    return PartCosts(
        0, "neuron", levels, torch.tensor(errors, dtype=torch.float64), torch.tensor(nbytes)
    )


def test_allocate_meets_the_budget_and_is_optimal_on_a_small_case() -> None:
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(12, generator=g).pow(4) * 100
    base = torch.tensor([4.0**-8, 4.0**-4, 4.0**-2], dtype=torch.float64)
    costs = costs_of((importance[:, None] * base).tolist(), [8, 4, 2])
    for budget in (24, 30, 41, 60, 96):
        result = allocate([costs], budget)
        assert result.nbytes <= budget
        # brute force over all 3^12 choices would be slow: check against exhaustive on 8 items
    small = costs_of((importance[:8, None] * base).tolist(), [8, 4, 2])
    import itertools

    for budget in (16, 22, 30, 40):
        best = min(
            sum(small.error[i, c].item() for i, c in enumerate(choice))
            for choice in itertools.product(range(3), repeat=8)
            if sum(small.nbytes[c].item() for c in choice) <= budget
        )
        got = allocate([small], budget)
        assert got.nbytes <= budget
        assert got.error <= best * 1.05 + 1e-18  # Lagrangian + greedy fill: near the optimum


def test_allocate_gives_heavy_items_more_bits() -> None:
    errors = [[1e-6 * s, 1e-3 * s, 1e-1 * s] for s in (1000.0, 1.0, 1.0, 1.0)]
    result = allocate([costs_of(errors, [8, 4, 2])], 8 + 3 * 2 + 2)
    assert result.widths[0].tolist()[0] == 8
    assert result.nbytes <= 16


def test_allocate_rejects_impossible_budgets() -> None:
    with pytest.raises(FFSplitError, match="below the 4 bytes"):
        allocate([costs_of([[1.0, 2.0, 3.0]] * 2, [8, 4, 2])], 3)


def test_allocation_over_parts_meets_the_ffn_budget_exactly_and_builds() -> None:
    weights, stats, x = gated_ffn()
    shape = FFNShape.from_weights(weights)
    dense = dense_ffn_bytes(shape)
    costs = neuron_part_costs(weights, stats, 0, GROUP)
    budget = math.floor(0.4 * dense)  # 60% smaller (group 16 costs 2 bits a weight)
    result = allocate(costs, budget - shape.bias_bytes(shape.m))
    plan = allocation_plans(costs, result, {0: torch.arange(M)})[0]
    planned = neuron_plan_bytes(shape, plan.up_gate.tolist(), plan.down.tolist(), GROUP)
    assert planned == result.nbytes + shape.bias_bytes(shape.m) <= budget
    # within one vector's largest step of the budget: nothing left worth a whole upgrade
    assert budget - planned < 2 * vector_bytes(D, 16, GROUP)
    modules = build_plan_ffn(weights, plan, GROUP, stats)
    assert sum(mod.nbytes() for mod in modules if mod is not None) == planned
    # the heavy hitters got more bits than the median neuron
    assert plan.down[:3].float().mean() > plan.down[3:].float().median()
    error = (ffn_output(modules, x) - dense_output(weights, x)).pow(2).sum()
    assert error / dense_output(weights, x).pow(2).sum() < 0.05


def test_allocation_beats_a_uniform_mix_at_equal_bytes() -> None:
    weights, stats, x = gated_ffn(seed=2)
    shape = FFNShape.from_weights(weights)
    dense = dense_ffn_bytes(shape)
    counts = solve_light_bits(shape, 0, 16, 0.65, GROUP, (8, 6, 5, 4, 3, 2))
    uniform = two_level_plan(torch.arange(M), 0, 16, counts)
    uniform_bytes = neuron_plan_bytes(shape, uniform.up_gate.tolist(), uniform.down.tolist(), GROUP)
    costs = neuron_part_costs(weights, stats, 0, GROUP)
    result = allocate(costs, uniform_bytes - shape.bias_bytes(shape.m))
    plan = allocation_plans(costs, result, {0: torch.arange(M)})[0]
    reference = dense_output(weights, x)

    def error(p) -> float:  # noqa: ANN001
        modules = build_plan_ffn(weights, p, GROUP, stats, gptq=False)
        return float((ffn_output(modules, x) - reference).pow(2).sum())

    assert result.nbytes + shape.bias_bytes(shape.m) <= uniform_bytes <= 0.35 * dense
    assert error(plan) < 0.8 * error(uniform)


def test_gptq_plan_beats_rtn_plan_and_dense_blocks_are_bf16() -> None:
    weights, stats, x = gated_ffn(seed=4)
    plan = two_level_plan(torch.arange(M), 3, 16, {4: 20, 3: M - 23})
    reference = dense_output(weights, x)
    errors = {}
    for gptq in (False, True):
        modules = build_plan_ffn(weights, plan, GROUP, stats, gptq=gptq)
        errors[gptq] = float((ffn_output(modules, x) - reference).pow(2).sum())
        heavy_up = modules[0].parts[0].dense_weight()
        assert torch.equal(heavy_up, heavy_up.to(torch.bfloat16).float())
    assert errors[True] < errors[False]
