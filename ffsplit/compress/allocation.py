"""Bit widths per neuron, per part and per layer from the heavy-hitter statistics, under a budget.

FFSplit (arXiv 2401.04044) gives the few heavy-hitter neurons (largest output norm ``s_j``) more of
the resource. For quantization this generalises to: every neuron vector may take any width of a
ladder (16 = kept bf16), and the widths minimise a proxy of the FFN output error subject to the
FFN byte budget. The heavy set is then whatever the budget makes worth a high width.

Proxy (units of output energy over the calibration tokens): quantizing one vector of neuron j
costs about ``s_j^2`` times that vector's relative error in the metric its input sees:
- down column ``v_j`` (input ``h_j``): ``S2_j ||dv||^2 = s_j^2 ||dv||^2 / ||v||^2`` (cross-neuron
  terms dropped);
- up/gate row ``w_j`` (input x, Gram G): ``||v_j||^2 E[a^2 (dw.x)^2] ~ s_j^2 (dw' G dw) / (w' G w)``
  when the other factor ``a`` (activation, or the up product for the gate) is independent of the
  row's error, and ``act(z) ~ z act'(z)`` for the gate.
Errors are measured by round to nearest at each width; GPTQ then lowers them for every width.

The choice is a multiple-choice knapsack, solved by Lagrangian relaxation (each item picks
``argmin error + lambda * bytes``, lambda bisected to the budget; Shoham & Gersho, IEEE TASSP
1988, the classical bit-allocation method) plus a greedy fill of the slack left by the last step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ffsplit.adapters import FFNWeights
from ffsplit.compress.budget import DENSE_BITS, vector_bytes
from ffsplit.compress.plans import NeuronPlan
from ffsplit.compress.quant import quantize_groups
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats
from ffsplit.split.qformat import dequantize

LEVELS = (16, 8, 6, 5, 4, 3, 2)  # every width the stored format holds, plus bf16
PARTS = ("up_gate", "down")  # a neuron's rows in up (and gate), and its down column
JOINT = "neuron"  # one width for all of a neuron's vectors
# Lambda bisection steps: halves a log-spaced bracket of ~1e30 to below float64 resolution.
_BISECT_STEPS = 200


def relative_errors(
    rows: Tensor,
    levels: Sequence[int],
    group_size: int,
    gram: Tensor | None = None,
    bias: Tensor | None = None,
    tokens: int = 0,
) -> Tensor:
    """``[n, len(levels)]`` relative RTN error of each row at each width (16: bf16 rounding),
    in the metric ``dw' G dw / (w' G w + tokens * b^2)`` when ``gram`` is given, else plain L2."""
    weight = rows.detach().to(torch.float32)
    metric = None if gram is None else gram.detach().to(weight.device, torch.float32)

    def energy(matrix: Tensor) -> Tensor:
        if metric is None:
            return matrix.double().pow(2).sum(1)
        return ((matrix @ metric) * matrix).double().sum(1)

    reference = energy(weight)
    if bias is not None and metric is not None:
        reference = reference + tokens * bias.detach().double().to(weight.device).pow(2)
    out = torch.empty(weight.shape[0], len(levels), dtype=torch.float64, device=weight.device)
    for i, bits in enumerate(levels):
        if bits == DENSE_BITS:
            restored = weight.to(torch.bfloat16).to(torch.float32)
        else:
            restored = dequantize(quantize_groups(weight, bits, group_size))
        out[:, i] = energy(weight - restored)
    return torch.where(reference[:, None] > 0, out / reference.clamp_min(1e-300)[:, None], 0.0)


@dataclass(frozen=True)
class PartCosts:
    """Candidate widths of one part of one layer: per-neuron proxy error ``[m, L]`` and the bytes
    of one neuron's vectors in this part at each width ``[L]``."""

    layer: int
    part: str
    levels: tuple[int, ...]
    error: Tensor
    nbytes: Tensor

    def __post_init__(self) -> None:
        if self.error.dim() != 2 or self.error.shape[1] != len(self.levels):
            raise FFSplitError(f"PartCosts: error must be [m, {len(self.levels)}]")
        if tuple(self.nbytes.shape) != (len(self.levels),):
            raise FFSplitError(f"PartCosts: nbytes must be [{len(self.levels)}]")


def neuron_part_costs(
    weights: FFNWeights,
    stats: LayerStats,
    layer: int,
    group_size: int,
    levels: Sequence[int] = LEVELS,
    joint: bool = False,
    scale: float = 1.0,
) -> list[PartCosts]:
    """The proxy costs of one FFN: parts ``up_gate`` and ``down`` (or one ``neuron`` part when
    ``joint``). ``scale`` multiplies the errors (e.g. to weigh layers against each other)."""
    if stats.gram_in is None:
        raise FFSplitError(f"layer {layer}: the allocation needs Gram matrices (collect_grams)")
    levels = tuple(levels)
    d = weights.hidden
    down = weights.down.detach().to(torch.float64)
    score_sq = stats.sum_sq.to(down.device) * down.pow(2).sum(0)
    rows = relative_errors(
        weights.up, levels, group_size, stats.gram_in, weights.up_bias, stats.tokens
    )
    row_matrices = 1
    if weights.gate is not None:
        rows = rows + relative_errors(
            weights.gate, levels, group_size, stats.gram_in, weights.gate_bias, stats.tokens
        )
        row_matrices = 2
    columns = relative_errors(weights.down.t(), levels, group_size)
    one = torch.tensor([vector_bytes(d, b, group_size) for b in levels], dtype=torch.int64)
    up_gate = (scale * score_sq[:, None] * rows.to(down.device), row_matrices * one)
    down_part = (scale * score_sq[:, None] * columns.to(down.device), one)
    if joint:
        return [PartCosts(layer, JOINT, levels, up_gate[0] + down_part[0], up_gate[1] + one)]
    return [
        PartCosts(layer, PARTS[0], levels, *up_gate),
        PartCosts(layer, PARTS[1], levels, *down_part),
    ]


@dataclass(frozen=True)
class Allocation:
    """Chosen width per neuron of each PartCosts (same order), their bytes, proxy error and the
    Lagrange multiplier (the marginal error per byte at the budget)."""

    widths: tuple[Tensor, ...]
    nbytes: int
    error: float
    multiplier: float


def _stack(costs: Sequence[PartCosts]) -> tuple[Tensor, Tensor, list[int], Tensor]:
    """All items' errors and bytes over the union of levels (inf error: level not offered)."""
    levels = sorted({b for c in costs for b in c.levels}, reverse=True)
    index = {b: i for i, b in enumerate(levels)}
    rows = sum(c.error.shape[0] for c in costs)
    error = torch.full((rows, len(levels)), torch.inf, dtype=torch.float64)
    nbytes = torch.zeros(rows, len(levels), dtype=torch.int64)
    start = 0
    for c in costs:
        stop = start + c.error.shape[0]
        columns = torch.tensor([index[b] for b in c.levels])
        error[start:stop, columns] = c.error.detach().cpu().to(torch.float64)
        nbytes[start:stop, columns] = c.nbytes.cpu()
        start = stop
    return error, nbytes, levels, torch.tensor(levels)


def _choose(error: Tensor, nbytes: Tensor, multiplier: float) -> Tensor:
    cost = error + multiplier * nbytes.to(torch.float64)
    return cost.argmin(dim=1)  # first minimum: the more precise width on ties


def _fill(error: Tensor, nbytes: Tensor, choice: Tensor, slack: int) -> Tensor:
    """Spend the slack on the upgrades with the most error saved per byte (one per item)."""
    rows = torch.arange(error.shape[0])
    current_error = error[rows, choice][:, None]
    current_bytes = nbytes[rows, choice][:, None]
    extra = nbytes - current_bytes
    gain = (current_error - error) / extra.clamp_min(1).to(torch.float64)
    gain = torch.where((extra > 0) & torch.isfinite(error), gain, -torch.inf)
    best_gain, best = gain.max(dim=1)
    choice = choice.clone()
    for item in torch.argsort(best_gain, descending=True, stable=True).tolist():
        if not best_gain[item] > 0:
            break
        cost = int(extra[item, best[item]])
        if cost <= slack:
            choice[item] = best[item]
            slack -= cost
    return choice


def allocate(costs: Sequence[PartCosts], budget: int) -> Allocation:
    """Widths minimising the summed proxy error with total bytes ``<= budget``."""
    if not costs:
        raise FFSplitError("allocate: no costs given")
    error, nbytes, _, levels = _stack(costs)
    finite = torch.where(torch.isfinite(error), nbytes, torch.iinfo(torch.int64).max)
    floor = int(finite.min(dim=1).values.sum())
    if floor > budget:
        raise FFSplitError(
            f"allocate: the budget of {budget} bytes is below the {floor} bytes of every vector "
            f"at its cheapest width; lower the reduction or add lower widths"
        )
    rows = torch.arange(error.shape[0])

    def spent(choice: Tensor) -> int:
        return int(nbytes[rows, choice].sum())

    low, high = 0.0, 1.0
    choice = _choose(error, nbytes, low)
    if spent(choice) > budget:
        while spent(_choose(error, nbytes, high)) > budget:
            low, high = high, high * 1e3
        for _ in range(_BISECT_STEPS):
            middle = (low + high) / 2 if high < 2 * low or low == 0 else (low * high) ** 0.5
            if spent(_choose(error, nbytes, middle)) > budget:
                low = middle
            else:
                high = middle
            if high - low <= 1e-12 * high:
                break
        choice = _fill(
            error,
            nbytes,
            _choose(error, nbytes, high),
            budget - spent(_choose(error, nbytes, high)),
        )
    widths, start = [], 0
    for c in costs:
        stop = start + c.error.shape[0]
        widths.append(levels[choice[start:stop]])
        start = stop
    total_error = float(error[rows, choice].sum())
    return Allocation(tuple(widths), spent(choice), total_error, high if low else 0.0)


def allocation_plans(
    costs: Sequence[PartCosts], allocation: Allocation, orders: Mapping[int, Tensor]
) -> dict[int, NeuronPlan]:
    """Per-layer plans from an allocation over :func:`neuron_part_costs` entries."""
    parts: dict[int, dict[str, Tensor]] = {}
    for c, widths in zip(costs, allocation.widths, strict=True):
        parts.setdefault(c.layer, {})[c.part] = widths
    plans = {}
    for layer, chosen in parts.items():
        if JOINT in chosen:
            plans[layer] = NeuronPlan(chosen[JOINT], chosen[JOINT].clone(), orders[layer])
        else:
            plans[layer] = NeuronPlan(chosen[PARTS[0]], chosen[PARTS[1]], orders[layer])
    return plans
