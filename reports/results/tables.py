"""Pure functions of rows: the dense references, the trade-off at equal FFN budget against every
baseline (method.md, "Baselines that a result must beat"), comparisons within probe noise, the
places where FFSplit does not beat a baseline, the heavy-ratio curves and whether their best ratio
transfers between models, the goals and the healing pairs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ffsplit.config import DEFAULT_HEAVY_RATIO
from reports.results.format import fmt_loss, fmt_points
from reports.results.rows import (
    BASELINE_SERIES,
    EQUAL_BYTES_TOLERANCE,
    FFSPLIT_SERIES,
    FLOAT_BYTES,
    GOAL_QUALITY_PCT,
    GOAL_REDUCTION,
    GOAL_TOLERANCE,
    MATCHED_BASELINES,
    SERIES_TITLES,
    SPLIT_SERIES,
    UNIFORM_OF,
    Z95,
    Row,
    finite,
)
from tracking.champion import quality_loss

# ------------------------------------------------------------------------------ dense reference


def dense_references(rows: Iterable[Row]) -> dict[str, Row]:
    """The latest dense run of each model."""
    out: dict[str, Row] = {}
    for row in rows:
        if row.is_dense:
            old = out.get(row.model)
            if old is None or row.start_time > old.start_time:
                out[row.model] = row
    return out


def with_reference(rows: Sequence[Row]) -> list[Row]:
    """Rows with loss, whole-model size reduction and FFN parameter reduction filled in from their
    model's dense run (logged metrics take precedence when a future sweep logs them)."""
    dense = dense_references(rows)
    out = []
    for row in rows:
        ref = dense.get(row.model)
        d = ref.metrics if ref is not None else {}
        out.append(
            dataclasses.replace(
                row,
                loss=_loss(row, d),
                model_reduction=_model_reduction(row.metrics, d),
                ffn_param_reduction=_ffn_param_reduction(row.metrics, d),
            )
        )
    return out


def _loss(row: Row, dense: Mapping[str, float]) -> float | None:
    """The logged quality change, else the quality against the dense run's."""
    loss = 0.0 if row.is_dense else quality_loss(row.metrics)
    if loss is None and row.quality is not None and finite(dense.get(row.quality_kind)):
        ratio = row.quality / float(dense[row.quality_kind])
        loss = 100.0 * (ratio - 1) if row.quality_kind == "perplexity" else -100.0 * (ratio - 1)
    return loss


def _model_reduction(m: Mapping[str, float], d: Mapping[str, float]) -> float | None:
    """Logged, else 1 - bytes / dense bytes."""
    reduction = _first(m, ("model_reduction", "model_size_reduction", "size_reduction"))
    if reduction is None and finite(m.get("bytes")) and finite(d.get("bytes")):
        reduction = 1.0 - m["bytes"] / d["bytes"]
    return reduction


def _ffn_param_reduction(m: Mapping[str, float], d: Mapping[str, float]) -> float | None:
    """Logged, else from FFN parameters, else from total parameters (only the FFN changes; dense
    FFN parameters = dense FFN bytes / 2)."""
    reduction = _first(m, ("ffn_param_reduction", "ffn_params_reduction"))
    if reduction is None and None not in (finite(m.get("ffn_params")), finite(d.get("ffn_params"))):
        reduction = 1.0 - m["ffn_params"] / d["ffn_params"] if d["ffn_params"] else None
    if reduction is None and None not in (
        finite(m.get("parameters")),
        finite(d.get("parameters")),
        finite(d.get("ffn_bytes")),
    ):
        dense_ffn_params = d["ffn_bytes"] / FLOAT_BYTES
        if dense_ffn_params > 0:
            reduction = (d["parameters"] - m["parameters"]) / dense_ffn_params
    return reduction


def _first(metrics: Mapping[str, float], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = finite(metrics.get(key))
        if value is not None:
            return value
    return None


def settings(rows: Sequence[Row], model: str) -> list[str]:
    """Settings of a model's variants, the one with most variants first."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.model == model and not r.is_dense:
            counts[r.setting] += 1
    return sorted(counts, key=lambda s: (-counts[s], s))


# ------------------------------------------------------------------------------- trade-off table


@dataclass(frozen=True)
class Column:
    """One column of the trade-off table: a family, at its best heavy ratio or a fixed one."""

    series: str
    heavy_ratio: float | None = None  # None: the best one (baselines: the best of their runs)

    @property
    def title(self) -> str:
        base = SERIES_TITLES.get(self.series, self.series)
        if self.series in FFSPLIT_SERIES:
            rho = "best ρ" if self.heavy_ratio is None else f"ρ {self.heavy_ratio:g}"
            return f"{base} ({rho})"
        return base


COLUMNS = (
    Column("ffsplit-lowrank"),
    Column("ffsplit-lowrank", DEFAULT_HEAVY_RATIO),
    Column("ffsplit-quant"),
    Column("ffsplit-quant", DEFAULT_HEAVY_RATIO),
    *(Column(s) for s in BASELINE_SERIES),
)


def best(rows: Iterable[Row]) -> Row | None:
    """The row with the least quality loss (ties: more FFN bytes saved, then label)."""
    ranked = [r for r in rows if r.loss is not None]
    if not ranked:
        return None
    return min(ranked, key=lambda r: (r.loss, -(r.ffn_reduction or 0.0), r.label, r.run_id))


def cell(rows: Iterable[Row], column: Column) -> Row | None:
    """The variant shown in a column: the best of its family (at the column's heavy ratio)."""
    return best(
        r
        for r in rows
        if r.series == column.series
        and (column.heavy_ratio is None or math.isclose(r.heavy_ratio, column.heavy_ratio))
    )


def noise_between(a: Row, b: Row) -> float | None:
    """Half-width of the 95% noise band of the difference of two probe accuracies,
    Z95 * sqrt(se_a^2 + se_b^2) (independent samples; see the page's noise paragraph); None unless
    both rows are accuracies with a known test-set size."""
    se_a, se_b = a.accuracy_stderr, b.accuracy_stderr
    if se_a is None or se_b is None:
        return None
    return Z95 * math.hypot(se_a, se_b)


def within_noise(a: Row, b: Row) -> bool | None:
    """Is the accuracy difference of a and b below their noise band? None when not measurable."""
    band = noise_between(a, b)
    if band is None or a.quality is None or b.quality is None:
        return None
    return abs(a.quality - b.quality) < band


@dataclass(frozen=True)
class Comparison:
    """Candidate against baseline at equal bytes. outcome: "win"; "no" (worse, tied, fewer bytes
    saved, or quality unknown); "noise" (accuracies closer than the probe's noise: neither a win
    nor a loss); "unknown" (accuracy with an unknown test-set size: noise cannot be judged)."""

    outcome: str
    reason: str  # "" for a win
    band: float | None = None  # accuracy rows: the noise half-width (fraction, see noise_between)


def compare(candidate: Row, baseline: Row) -> Comparison:
    """Candidate vs baseline: it wins with strictly less quality loss while saving at least as
    many FFN bytes (within EQUAL_BYTES_TOLERANCE); for probe accuracies the difference must also
    exceed the noise band. Perplexity is compared exactly (fixed text, deterministic)."""
    c_red, b_red = candidate.ffn_reduction or 0.0, baseline.ffn_reduction or 0.0
    if candidate.loss is None or baseline.loss is None:
        return Comparison("no", "quality unknown")
    if c_red < b_red - EQUAL_BYTES_TOLERANCE:
        return Comparison(
            "no",
            f"saves fewer FFN bytes ({100 * c_red:.1f}% vs {100 * b_red:.1f}%), so equal budget is not met",
        )
    band = None
    if "accuracy" in (candidate.quality_kind, baseline.quality_kind):
        band = noise_between(candidate, baseline)
        if band is None:
            unknown = [r.label for r in (candidate, baseline) if r.accuracy_stderr is None]
            return Comparison(
                "unknown", f"noise not judged: test-set size unknown for {', '.join(unknown)}"
            )
        if within_noise(candidate, baseline):
            return Comparison("noise", f"within noise (±{fmt_points(band)})", band)
    beyond = ""
    if band is not None:  # two decimals: a difference just past the band must read as such
        apart = 100 * abs((candidate.quality or 0.0) - (baseline.quality or 0.0))
        beyond = f" ({apart:.2f} pt apart, beyond noise ±{100 * band:.2f} pt)"
    if candidate.loss < baseline.loss:
        return Comparison("win", "", band)
    if candidate.loss == baseline.loss:
        return Comparison("no", f"ties ({fmt_loss(candidate.loss)})", band)
    return Comparison(
        "no", f"worse: {fmt_loss(candidate.loss)} vs {fmt_loss(baseline.loss)}{beyond}", band
    )


def beats(candidate: Row, baseline: Row) -> tuple[bool, str]:
    """(does candidate beat baseline at equal bytes, why not): `compare` as a yes/no; a
    difference within probe noise is not a win."""
    got = compare(candidate, baseline)
    return got.outcome == "win", got.reason


@dataclass(frozen=True)
class BudgetLine:
    """One row of a trade-off table: a budget under one setting, its cells and the verdict."""

    model: str
    setting: str
    budget: float
    cells: Mapping[Column, Row | None]
    ffsplit: Row | None  # the best FFSplit variant at this budget (any method, any ρ)
    beats_all: bool | None  # None: no FFSplit variant or no baseline to compare with
    beaten_by: tuple[str, ...]  # baseline families the best FFSplit variant does not beat
    missing: tuple[str, ...]  # baseline families with no run at this budget
    versus: Mapping[str, Comparison] = field(default_factory=dict)  # per present baseline

    def _with(self, outcome: str) -> tuple[str, ...]:
        return tuple(s for s, c in self.versus.items() if c.outcome == outcome)

    @property
    def within_noise(self) -> tuple[str, ...]:
        """Baseline families whose accuracy is within probe noise of the best FFSplit variant."""
        return self._with("noise")

    @property
    def unjudged(self) -> tuple[str, ...]:
        """Baseline families compared on accuracy with an unknown test-set size."""
        return self._with("unknown")


def tradeoff(rows: Sequence[Row], model: str) -> list[BudgetLine]:
    """The trade-off table of one model: one line per (setting, budget)."""
    groups: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for row in rows:
        if row.model == model and not row.is_dense:
            groups[(row.setting, round(row.budget, 6))].append(row)
    out = []
    for (setting, budget), group in sorted(groups.items()):
        cells = {c: cell(group, c) for c in COLUMNS}
        top = best(r for r in group if r.series in FFSPLIT_SERIES)
        present = [s for s in BASELINE_SERIES if cells[Column(s)] is not None]
        versus = {} if top is None else {s: compare(top, cells[Column(s)]) for s in present}
        beaten_by = tuple(s for s, c in versus.items() if c.outcome == "no")
        wins = all(c.outcome == "win" for c in versus.values())
        verdict = None if top is None or not present else wins
        missing = tuple(s for s in BASELINE_SERIES if s not in present)
        out.append(
            BudgetLine(model, setting, budget, cells, top, verdict, beaten_by, missing, versus)
        )
    return out


@dataclass(frozen=True)
class Shortfall:
    """An FFSplit variant that does not beat a like-for-like baseline at its budget."""

    model: str
    setting: str
    budget: float
    column: Column
    ffsplit: Row
    baseline: Row
    reason: str
    outcome: str = "no"  # Comparison.outcome: "no", "noise" or "unknown"


def shortfalls(lines: Iterable[BudgetLine]) -> list[Shortfall]:
    """Every (budget, FFSplit column, matched baseline) where FFSplit does not win."""
    out = []
    for line in lines:
        for column in COLUMNS:
            mine = line.cells[column]
            if column.series not in FFSPLIT_SERIES or mine is None:
                continue
            for series in MATCHED_BASELINES[column.series]:
                other = line.cells[Column(series)]
                if other is None:
                    continue
                got = compare(mine, other)
                if got.outcome != "win":
                    out.append(
                        Shortfall(
                            line.model,
                            line.setting,
                            line.budget,
                            column,
                            mine,
                            other,
                            got.reason,
                            got.outcome,
                        )
                    )
    return out


def matched_record(
    lines: Sequence[BudgetLine], falls: Sequence[Shortfall], model: str, series: str
) -> tuple[int, int, int]:
    """Over a model's trade-off lines: (budgets where an FFSplit series at its best ρ beats
    every matched baseline that ran, budgets with a matched baseline to compare with, of these
    those within probe noise of a baseline but not beaten)."""
    column = Column(series)
    compared = [
        x
        for x in lines
        if x.cells[column] is not None
        and any(x.cells[Column(b)] is not None for b in MATCHED_BASELINES[series])
    ]
    mine = [f for f in falls if f.model == model and f.column == column]
    failed = {(f.setting, f.budget) for f in mine}
    lost = {(f.setting, f.budget) for f in mine if f.outcome == "no"}
    ok = [x for x in compared if (x.setting, x.budget) not in failed]
    noisy = [x for x in compared if (x.setting, x.budget) in failed - lost]
    return len(ok), len(compared), len(noisy)


# ------------------------------------------------------------------------------ heavy-ratio sweep

CurveKey = tuple[str, str, str, float]  # (model, setting, series, budget)


def heavy_ratio_curves(rows: Iterable[Row]) -> dict[CurveKey, dict[float, Row]]:
    """Quality vs heavy ratio: per (model, setting, split family, budget), ρ -> best variant."""
    groups: dict[CurveKey, dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.series in SPLIT_SERIES:
            key = (row.model, row.setting, row.series, round(row.budget, 6))
            groups[key][round(row.heavy_ratio, 6)].append(row)
    out = {}
    for key, by_rho in groups.items():
        picked = {rho: best(rs) for rho, rs in by_rho.items()}
        out[key] = {rho: r for rho, r in sorted(picked.items()) if r is not None}
    return out


def uniform_baselines(rows: Iterable[Row]) -> dict[CurveKey, Row]:
    """ρ = 0 of the heavy-ratio curves: the best uniform (no split) variant of the same
    compressor, per (model, setting, FFSplit series, budget)."""
    split_of = {uniform: series for series, uniform in UNIFORM_OF.items()}
    groups: dict[CurveKey, list[Row]] = defaultdict(list)
    for r in rows:
        if r.series in split_of:
            groups[(r.model, r.setting, split_of[r.series], round(r.budget, 6))].append(r)
    return {k: b for k, v in groups.items() if (b := best(v)) is not None}


def ranks(curve: Mapping[float, Row]) -> dict[float, int]:
    """1 = the heavy ratio with the least loss (ties: the smaller ratio)."""
    order = sorted(curve, key=lambda rho: (curve[rho].loss, rho))
    return {rho: i + 1 for i, rho in enumerate(order)}


def best_ratio(curve: Mapping[float, Row]) -> float | None:
    r = ranks(curve)
    return min(r, key=r.get) if r else None


def best_ratio_overall(
    curves: Mapping[CurveKey, Mapping[float, Row]], model: str, series: str, setting: str
) -> tuple[float | None, int]:
    """(the heavy ratio with the best mean rank over the budgets of a family, budgets used): only
    ratios present at every budget with >= 2 ratios compete."""
    chosen = [
        c
        for (m, s, fam, _), c in curves.items()
        if m == model and s == setting and fam == series and len(c) >= 2
    ]
    if not chosen:
        return None, 0
    common = set.intersection(*(set(c) for c in chosen))
    if not common:
        return None, len(chosen)
    per_curve = [ranks({rho: c[rho] for rho in common}) for c in chosen]
    mean_rank = {rho: statistics.fmean(r[rho] for r in per_curve) for rho in common}
    mean_loss = {rho: statistics.fmean(c[rho].loss for c in chosen) for rho in common}
    return min(common, key=lambda rho: (mean_rank[rho], mean_loss[rho], rho)), len(chosen)


@dataclass(frozen=True)
class Transfer:
    """Best heavy ratio found on one model, tried on another (same family and budget)."""

    series: str
    budget: float
    source: str
    target: str
    source_best: float
    target_best: float
    rank_on_target: int  # 1 = it is the target's best too
    candidates: int  # heavy ratios compared (those both models ran)
    extra_loss: float  # target's loss at source_best minus the target's best loss (pp)
    # Accuracy targets: is that extra loss within probe noise (None: perplexity, or n unknown)?
    within_noise: bool | None = None
    band: float | None = None  # its noise half-width (fraction of accuracy)

    @property
    def transfers(self) -> bool:
        return self.rank_on_target == 1


def transfer(curves: Mapping[CurveKey, Mapping[float, Row]]) -> list[Transfer]:
    """For every family and budget run on two or more models: does one model's best heavy ratio
    (among the ratios both ran) stay best on the other, and what does using it cost there?
    Each model contributes its curve with the most ratios (ties: the default setting first)."""
    per: dict[tuple[str, float], dict[str, Mapping[float, Row]]] = defaultdict(dict)
    for (model, _setting, series, budget), curve in sorted(
        curves.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], -len(kv[1]), kv[0][1])
    ):
        per[(series, budget)].setdefault(model, curve)
    out = []
    for (series, budget), by_model in sorted(per.items()):
        for a in sorted(by_model):
            for b in sorted(by_model):
                common = set(by_model[a]) & set(by_model[b])
                if a != b and len(common) >= 2:
                    ca = {rho: by_model[a][rho] for rho in common}
                    cb = {rho: by_model[b][rho] for rho in common}
                    out.append(_transfer(series, budget, a, b, ca, cb))
    return out


def _transfer(
    series: str, budget: float, a: str, b: str, ca: Mapping[float, Row], cb: Mapping[float, Row]
) -> Transfer:
    """Model a's best ratio on model b, over their common ratios."""
    best_a, best_b = best_ratio(ca), best_ratio(cb)
    moved = best_a != best_b
    return Transfer(
        series,
        budget,
        a,
        b,
        best_a,
        best_b,
        ranks(cb)[best_a],
        len(cb),
        cb[best_a].loss - cb[best_b].loss,
        within_noise(cb[best_a], cb[best_b]) if moved else None,
        noise_between(cb[best_a], cb[best_b]) if moved else None,
    )


# ---------------------------------------------------------------------------------- goals, healing


@dataclass(frozen=True)
class Goal:
    """The best variant of a model that meets a size goal, and whether its quality goal holds."""

    model: str
    goal: str  # "ffn_bytes" or "ffn_params"
    best: Row | None
    best_ffsplit: Row | None

    @property
    def met(self) -> bool:
        return self.best is not None and self.best.loss <= GOAL_QUALITY_PCT


def goals(rows: Sequence[Row]) -> list[Goal]:
    """Per causal LM: the best variant with >= 43.1% fewer FFN bytes, and the best low-rank or
    pruned variant (healed or not) with >= 43.1% fewer FFN parameters; goal: <= +1% perplexity."""
    out = []
    threshold = GOAL_REDUCTION - GOAL_TOLERANCE
    for model in sorted({r.model for r in rows}):
        mine = [r for r in rows if r.model == model and not r.is_dense and r.loss is not None]
        if not any(r.quality_kind == "perplexity" for r in mine):
            continue
        by_bytes = [r for r in mine if (r.ffn_reduction or 0.0) >= threshold]
        by_params = [
            r
            for r in mine
            if r.method in ("lowrank", "prune") and (r.ffn_param_reduction or 0.0) >= threshold
        ]
        for name, pool in (("ffn_bytes", by_bytes), ("ffn_params", by_params)):
            out.append(
                Goal(model, name, best(pool), best(r for r in pool if r.series in FFSPLIT_SERIES))
            )
    return out


def healing_pairs(rows: Sequence[Row]) -> list[tuple[Row, Row]]:
    """(without, with healing) at the same recipe otherwise, where both exist."""
    plain: dict[tuple, Row] = {}
    healed: list[Row] = []
    for row in rows:
        if row.is_dense:
            continue
        if row.healed:
            healed.append(row)
        else:
            plain.setdefault(_recipe_key(row), row)
    return [(plain[_recipe_key(h)], h) for h in healed if _recipe_key(h) in plain]


def _recipe_key(row: Row) -> tuple:
    setting = ", ".join(p for p in row.setting.split(", ") if p and not p.startswith("heal"))
    return (
        row.model,
        row.series,
        row.method,
        round(row.heavy_ratio, 6),
        round(row.budget, 6),
        row.selection,
        setting,
    )
