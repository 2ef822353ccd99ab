"""The page: one function per section, each a list of markdown paragraphs (joined by blank lines),
and the charts it draws (reports.plots.loss_chart); `write_page` writes the page and its plots.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ffsplit.config import DEFAULT_HEAVY_RATIO
from reports.results.format import (
    fmt_budget,
    fmt_loss,
    fmt_number,
    fmt_pct,
    fmt_points,
    fmt_quality,
    loss_title,
    setting_text,
    slug,
    table,
)
from reports.results.lowbit import lowbit_section
from reports.results.observation import observation_section
from reports.results.rows import (
    COMMAND_TAG,
    EQUAL_BYTES_TOLERANCE,
    FFSPLIT_SERIES,
    GOAL_QUALITY_PCT,
    GOAL_REDUCTION,
    RECORD_ARTIFACT,
    RUN_DIR_TAG,
    SERIES_COLORS,
    SERIES_MARKERS,
    SERIES_TITLES,
    SPLIT_SERIES,
    Z95,
    Row,
    Source,
)
from reports.results.tables import (
    COLUMNS,
    BudgetLine,
    CurveKey,
    Goal,
    Shortfall,
    best_ratio,
    best_ratio_overall,
    dense_references,
    goals,
    healing_pairs,
    heavy_ratio_curves,
    matched_record,
    noise_between,
    settings,
    shortfalls,
    tradeoff,
    transfer,
    uniform_baselines,
    within_noise,
)

# Plot files this page writes (write_page removes those of an earlier page that this one did not).
PAGE_PLOTS = re.compile(
    r"-((tradeoff|heavy-ratio|lowbit)(-s\d+)?|observation|ablation|ablation-hidden)\.png$"
)


@dataclass(frozen=True)
class Page:
    """What the sections share: the rows and what is worked out from them once."""

    rows: Sequence[Row]
    source: Source
    models: list[str]
    lines: Mapping[str, list[BudgetLine]]  # trade-off lines per model
    falls: list[Shortfall]
    curves: Mapping[CurveKey, Mapping[float, Row]]
    plots_dir: Path
    plots_link: str

    @classmethod
    def of(cls, rows: Sequence[Row], source: Source, plots_dir: Path, plots_link: str) -> Page:
        models = sorted({r.model for r in rows})
        lines = {m: tradeoff(rows, m) for m in models}
        falls = shortfalls(line for m in models for line in lines[m])
        curves = heavy_ratio_curves(rows)
        return cls(rows, source, models, lines, falls, curves, plots_dir, plots_link)

    def rows_of(self, model: str) -> list[Row]:
        return [r for r in self.rows if r.model == model]


def render(
    rows: Sequence[Row],
    source: Source,
    generated_at: datetime,
    plots_dir: Path,
    plots_link: str,
    command: str,
) -> tuple[str, list[Path]]:
    """(the page's markdown, the plot files written into plots_dir). rows: with_reference'd."""
    page = Page.of(rows, source, plots_dir, plots_link)
    observation, observation_plots = observation_section(
        source.observations, page.models, plots_dir, plots_link
    )
    tradeoff_md, tradeoff_plots = tradeoff_section(page)
    heavy_md, heavy_plots = heavy_ratio_section(page)
    lowbit_md, lowbit_plots = lowbit_section(rows, page.models, plots_dir, plots_link)
    md = [
        *header(page, generated_at, command),
        *summary_section(page),
        *dense_section(page),
        observation,
        *tradeoff_md,
        *shortfalls_section(page),
        *lowbit_md,
        *heavy_md,
        *transfer_section(page),
        *goals_section(page),
        *healing_section(page),
        *variants_section(page),
        *provenance_section(page, generated_at),
    ]
    return "\n".join(md), [*observation_plots, *tradeoff_plots, *lowbit_plots, *heavy_plots]


def write_page(
    rows: Sequence[Row],
    source: Source,
    out: str | Path,
    *,
    generated_at: datetime,
    command: str,
) -> tuple[Path, list[Path]]:
    """Write the plots into <out without .md>/ and then the page, each atomically; plots of an
    earlier generation that this one did not make are removed. Returns (page, plots)."""
    from ffsplit.files import write_text_atomic

    out = Path(out)
    plots_dir = out.with_suffix("")
    text, plots = render(rows, source, generated_at, plots_dir, plots_dir.name, command)
    for stale in plots_dir.glob("*.png"):
        if stale not in plots and PAGE_PLOTS.search(stale.name):
            stale.unlink()
    write_text_atomic(out, text)
    return out, plots


# ----------------------------------------------------------------------------------- the top


def header(page: Page, generated_at: datetime, command: str) -> list[str]:
    """Title, how the page was made, what was read, how to read the numbers (and probe noise)."""
    source = page.source
    observed = (
        f"; the observation section shows {len(source.observations)} observation run(s).\n"
        if source.observations
        else ".\n"
    )
    md = [
        "# Results: FFSplit against its baselines at equal FFN budget\n",
        "Generated from the MLflow runs of the project's flows by\n\n"
        f"```\n{command}\n```\n\n"
        "(it reads the experiments `ffsplit/<model>` of `MLFLOW_TRACKING_URI`, or of "
        "`--tracking-uri`, and rewrites this page and its plots in "
        f"`{page.plots_link}/`); do not edit by hand.\n",
        f"Generated {generated_at.strftime('%Y-%m-%d %H:%M UTC')} from {source.uri}: "
        f"{len(page.rows)} variants of {len(page.models)} model(s) ({source.runs_read} runs "
        f"read, {source.incomplete} incomplete or failed skipped, {source.duplicates} duplicates "
        "of a variant dropped, the latest kept)" + observed,
        _reading_paragraph(),
    ]
    accuracy_rows = [r for r in page.rows if r.quality_kind == "accuracy" and r.quality is not None]
    if accuracy_rows:
        md.append(_noise_paragraph(accuracy_rows))
    return md


def _reading_paragraph() -> str:
    return (
        "Reading the numbers: quality loss is the perplexity increase over the dense model in % "
        "(causal LMs) or the accuracy drop in % (encoders), measured by each sweep against its own "
        "dense evaluation; lower is better. Budgets are target FFN byte reductions; the tables show "
        "the achieved ones. A method's cell is its best run at that budget: for FFSplit the best "
        "heavy ratio ρ (chosen on these same evaluation numbers, so optimistic) and the sweep's "
        f"default ρ {DEFAULT_HEAVY_RATIO:g}; for a baseline the best of its runs (random split: "
        "over its ρ and seeds). FFSplit beats a baseline when its loss is strictly lower while it "
        f"saves at least as many FFN bytes (within {100 * EQUAL_BYTES_TOLERANCE:.1f} points); "
        "for probe accuracies the difference must also exceed the probe's noise (below). "
        "Perplexity is compared as logged: the evaluation text is fixed and perplexity is "
        "deterministic for a given model, so there is no sampling noise to allow for. "
        "Whole-model size reduction is 1 - bytes / dense bytes; FFN parameter reduction is "
        "derived from total parameters (only the FFN changes) unless a run logs `ffn_params`.\n"
    )


def _noise_paragraph(accuracy_rows: Sequence[Row]) -> str:
    """How the page treats probe accuracies: intervals, the noise rule and its approximation."""
    sizes = sorted({r.test_examples for r in accuracy_rows if r.test_examples})
    unknown = [r for r in accuracy_rows if not r.test_examples]
    errors = [se for r in accuracy_rows if (se := r.accuracy_stderr) is not None]
    text = (
        "Probe noise: an encoder's accuracy is a linear probe's on n labelled test examples"
        + (f" (n = {', '.join(str(n) for n in sizes)})" if sizes else "")
        + ", a binomial estimate with standard error se = sqrt(p(1-p)/n)"
        + (f" (here {fmt_points(min(errors))} to {fmt_points(max(errors))})" if errors else "")
        + f". Accuracy cells show p ± {Z95:g} se, a 95% interval. A difference between two "
        f'accuracies smaller than {Z95:g} sqrt(se_a² + se_b²) is "within noise (±x pt)" '
        "(pt: accuracy percentage points): neither a win nor a loss in the verdicts, the list of "
        "places where FFSplit does not beat a baseline, the heavy-ratio transfer and the healing "
        "table. The rule treats the two accuracies as independent samples; every variant is "
        "probed on the same test examples, so a paired test (McNemar's, on the examples where the "
        "two disagree) would be sharper, but it needs per-example predictions, which the runs do "
        "not log. n comes from each run's `accuracy_test_examples` metric, else from its "
        f"`{RECORD_ARTIFACT}` artifact"
    )
    if unknown:
        text += (
            f"; {len(unknown)} accuracy run(s) have neither, so their n is unknown: their cells "
            'say "n unknown" and their differences are not judged ('
            + ", ".join(f"`{r.label}`" for r in unknown[:8])
            + (", ..." if len(unknown) > 8 else "")
            + ")"
        )
    return text + ".\n"


# ------------------------------------------------------------------------------------ summary


def summary_section(page: Page) -> list[str]:
    """One sentence per model (verdicts at every budget), one per goal."""
    md = ["## Summary\n"]
    md += [_model_summary(page, model) for model in page.models]
    md += ["- " + _goal_sentence(goal) for goal in goals(page.rows)]
    return [*md, ""]


def _titles(series: Sequence[str]) -> str:
    return ", ".join(SERIES_TITLES[s] for s in series)


def _where(line: BudgetLine) -> str:
    return f"{fmt_budget(line.budget)}{' [' + line.setting + ']' if line.setting else ''}"


def _model_summary(page: Page, model: str) -> str:
    """Where the best FFSplit variant beats every baseline, and each FFSplit series its matched
    baselines."""
    judged = [x for x in page.lines[model] if x.beats_all is not None]
    if not judged:
        text = f"- **{model}**: no budget has both an FFSplit run and a baseline run yet"
    else:
        wins = [x for x in judged if x.beats_all]
        text = (
            f"- **{model}**: the best FFSplit variant beats every baseline run at {len(wins)} of "
            f"{len(judged)} budgets"
        )
    losses = [x for x in judged if x.beaten_by]
    if losses:
        text += "; not at " + "; ".join(
            f"{_where(x)} (beaten by {_titles(x.beaten_by)})" for x in losses
        )
    unclear = [x for x in judged if not x.beats_all and (x.within_noise or x.unjudged)]
    if unclear:
        text += "; no clear winner (within probe noise) against " + "; ".join(
            f"{_titles((*x.within_noise, *x.unjudged))} at {_where(x)}" for x in unclear
        )
    for series in FFSPLIT_SERIES:
        ok, compared, noisy = matched_record(page.lines[model], page.falls, model, series)
        if not compared:
            continue
        text += (
            f"; {SERIES_TITLES[series]} (best ρ) beats its matched baselines at {ok} of "
            f"{compared} budgets"
            + (
                f" (at {noisy} of them within probe noise of a baseline, not beaten)"
                if noisy
                else ""
            )
        )
    return text + "."


def _goal_sentence(goal: Goal) -> str:
    what = (
        f"≥ {100 * GOAL_REDUCTION:.1f}% smaller FFN (bytes)"
        if goal.goal == "ffn_bytes"
        else f"≥ {100 * GOAL_REDUCTION:.1f}% fewer FFN parameters"
    )
    if goal.best is None:
        return f"**{goal.model}**, {what}: no variant reaches that size yet (goal not met)."
    verdict = "met" if goal.met else "**not met**"
    healed = ", healed" if goal.best.healed else ""
    return (
        f"**{goal.model}**, {what}: best is {goal.best.label}{healed} at "
        f"{fmt_loss(goal.best.loss)} perplexity; goal +{GOAL_QUALITY_PCT:g}% {verdict}."
    )


def dense_section(page: Page) -> list[str]:
    """Each model's dense reference: quality, sizes, run."""
    dense = dense_references(page.rows)

    def line(m: str) -> tuple[str, ...]:
        if m not in dense:
            return (m, "no dense run", "-", "-", "-", "-", "-")
        d = dense[m]
        return (
            m,
            fmt_quality(d),
            f"{d.metrics.get('parameters', math.nan) / 1e6:.1f} M",
            f"{d.metrics.get('bytes', math.nan) / 1e6:.1f} MB",
            f"{d.metrics.get('ffn_bytes', math.nan) / 1e6:.1f} MB",
            f"`{d.run_id}`",
            d.version or "-",
        )

    head = ("model", "quality", "parameters", "bytes", "FFN bytes", "run", "model version")
    return ["## Dense references\n", table(head, [line(m) for m in page.models])]


# ----------------------------------------------------------------------------------- trade-off


def _suffix(index: int) -> str:
    """Plot file suffix of a model's index-th setting ("" for its main one)."""
    return "" if index == 0 else f"-s{index + 1}"


def tradeoff_section(page: Page) -> tuple[list[str], list[Path]]:
    """Per model and setting: the quality-loss table, the size table, the chart."""
    md = ["## Trade-off at equal FFN budget\n"]
    written: list[Path] = []
    for model in page.models:
        for index, setting in enumerate(settings(page.rows, model)):
            lines = [x for x in page.lines[model] if x.setting == setting]
            if not lines:
                continue
            name = f"{slug(model)}-tradeoff{_suffix(index)}.png"
            title = f"{model}: quality loss vs FFN reduction ({setting_text(setting)})"
            written.append(_tradeoff_chart(lines, title, page.plots_dir / name))
            md += [
                f"### {model}: {setting_text(setting)}\n",
                f"Quality loss as {loss_title(page.rows_of(model))} of the best run of each "
                "method per budget:\n",
                _loss_table(lines),
                "Achieved FFN byte reduction / whole-model size reduction of the same runs:\n",
                _size_table(lines),
                f"![{model} trade-off]({page.plots_link}/{name})\n",
            ]
    return md, written


def _loss_table(lines: Sequence[BudgetLine]) -> str:
    def text(row: Row | None, show_rho: bool) -> str:
        if row is None:
            return "-"
        return f"{fmt_loss(row.loss)} ({fmt_quality(row)})" + (
            f" ρ {row.heavy_ratio:g}" if show_rho else ""
        )

    head = ("budget", *(c.title for c in COLUMNS), "best FFSplit beats every baseline?")
    body = [
        (
            fmt_budget(x.budget),
            *(
                text(x.cells[c], c.series in FFSPLIT_SERIES and c.heavy_ratio is None)
                for c in COLUMNS
            ),
            _verdict_text(x),
        )
        for x in lines
    ]
    return table(head, body)


def _size_table(lines: Sequence[BudgetLine]) -> str:
    body = [
        (
            fmt_budget(x.budget),
            *(
                "-"
                if (r := x.cells[c]) is None
                else f"{fmt_pct(r.ffn_reduction)} / {fmt_pct(r.model_reduction)}"
                for c in COLUMNS
            ),
        )
        for x in lines
    ]
    return table(("budget", *(c.title for c in COLUMNS)), body)


def _verdict_text(line: BudgetLine) -> str:
    if line.beats_all is None:
        return "no comparison" if line.ffsplit is not None else "no FFSplit run"
    parts = []
    if line.beats_all:
        parts.append("yes")
    if line.beaten_by:
        parts.append("**no**: " + _titles(line.beaten_by))
    if line.within_noise:
        bands = {s: fmt_points(line.versus[s].band or 0.0) for s in line.within_noise}
        if len(set(bands.values())) == 1:
            parts.append(
                f"within noise (±{next(iter(bands.values()))}) of {_titles(line.within_noise)}"
            )
        else:
            parts.append(
                "within noise of "
                + ", ".join(f"{SERIES_TITLES[s]} (±{b})" for s, b in bands.items())
            )
    if line.unjudged:
        parts.append("not judged (test-set size unknown): " + _titles(line.unjudged))
    text = "; ".join(parts)
    if line.missing:
        text += f" (not run: {_titles(line.missing)})"
    return text


def _tradeoff_chart(lines: Sequence[BudgetLine], title: str, out: Path) -> Path:
    """Quality loss vs achieved FFN reduction, one line per column (method or baseline)."""
    from reports.plots import LossCurve, loss_chart

    curves, shown = [], []
    for column in COLUMNS:
        points = sorted(
            (r.ffn_reduction, r.loss)
            for line in lines
            if (r := line.cells[column]) is not None and r.ffn_reduction is not None
        )
        if not points:
            continue
        shown += [r for line in lines if (r := line.cells[column]) is not None]
        style = "-" if column.series in FFSPLIT_SERIES else "--"
        curves.append(
            LossCurve(
                column.title,
                [100 * x for x, _ in points],
                [y for _, y in points],
                ":" if column.heavy_ratio is not None else style,
                SERIES_COLORS.get(column.series),
                SERIES_MARKERS.get(column.series, "o"),
            )
        )
    return loss_chart(
        curves,
        out,
        title=title,
        xlabel="achieved FFN reduction (% of FFN bytes)",
        dense_point=True,
        legend_loc="upper left",
        **_loss_axis(shown),
    )


def _loss_axis(rows: Sequence[Row]) -> dict[str, Any]:
    """loss_chart's y axis for these rows: label, lowest loss, the goal line for perplexity."""
    perplexity = any(r.quality_kind == "perplexity" for r in rows)
    return {
        "ylabel": loss_title(rows),
        "lowest": min((r.loss for r in rows if r.loss is not None), default=0.0),
        "goal_pct": GOAL_QUALITY_PCT if perplexity else None,
    }


def shortfalls_section(page: Page) -> list[str]:
    """Every FFSplit column against its matched baselines where it does not win."""
    md = ["## Where FFSplit does not beat a baseline\n"]
    if not page.falls:
        md.append(
            "Nowhere among the runs read: at every budget each FFSplit method (at its best ρ and "
            f"at ρ {DEFAULT_HEAVY_RATIO:g}) beats its matched baselines (same compressor uniform and "
            "random split, and score pruning) that were run.\n"
        )
        return md
    md.append(
        "Each FFSplit method against its matched baselines (the same compressor uniform and "
        "with a random split, and score pruning), at every budget where both were run"
        + (
            '; "within noise" is no loss either: the two accuracies differ by less than '
            "the probe's noise"
            if any(f.outcome != "no" for f in page.falls)
            else ""
        )
        + ":\n"
    )
    head = ("model", "setting", "budget", "FFSplit", "run", "baseline", "run", "why")
    body = [
        (
            f.model,
            f.setting or "default",
            fmt_budget(f.budget),
            f.column.title,
            f"{f.ffsplit.label} {fmt_loss(f.ffsplit.loss)}",
            SERIES_TITLES[f.baseline.series],
            f"{f.baseline.label} {fmt_loss(f.baseline.loss)}",
            f.reason,
        )
        for f in page.falls
    ]
    md.append(table(head, body))
    return md


# -------------------------------------------------------------------------------- heavy ratio


def heavy_ratio_section(page: Page) -> tuple[list[str], list[Path]]:
    """Per model and setting swept over two or more heavy ratios: loss by ρ, best ρ, chart."""
    md = ["## Heavy-ratio sweep\n"]
    written: list[Path] = []
    uniform = uniform_baselines(page.rows)
    for model in page.models:
        for index, setting in enumerate(settings(page.rows, model)):
            mine = {k: c for k, c in page.curves.items() if k[0] == model and k[1] == setting}
            if not any(len(c) >= 2 for c in mine.values()):
                continue
            plain = {(k[2], k[3]): r for k, r in uniform.items() if k[:2] == (model, setting)}
            title = f"{model}: quality loss vs heavy ratio ({setting_text(setting)})"
            name = f"{slug(model)}-heavy-ratio{_suffix(index)}.png"
            written.append(_heavy_ratio_chart(mine, plain, title, page.plots_dir / name))
            md += _heavy_ratio_tables(page, model, setting, mine, plain)
            md.append(f"![{model} heavy ratio]({page.plots_link}/{name})\n")
    if not written:
        md.append("No sweep ran two or more heavy ratios at one budget yet.\n")
    return md, written


def _heavy_ratio_tables(
    page: Page,
    model: str,
    setting: str,
    mine: Mapping[CurveKey, Mapping[float, Row]],
    uniform: Mapping[tuple[str, float], Row],
) -> list[str]:
    """Loss by heavy ratio (FFSplit's uniform baseline at ρ 0), the noise of probe accuracies, best ρ by mean rank."""
    rhos = sorted({rho for c in mine.values() for rho in c})
    body = []
    for (_, _, series, budget), curve in sorted(mine.items(), key=lambda kv: kv[0][2:]):
        base = uniform.get((series, budget))
        top = best_ratio(curve)
        losses = (
            "-" if rho not in curve else _bold(fmt_loss(curve[rho].loss), rho == top)
            for rho in rhos
        )
        body.append(
            (
                SERIES_TITLES[series],
                fmt_budget(budget),
                "-" if base is None else fmt_loss(base.loss),
                *losses,
                f"{top:g}",
            )
        )
    head = ("method", "budget", "ρ 0 (uniform)", *(f"ρ {r:g}" for r in rhos), "best ρ")
    md = [
        f"### {model}: {setting_text(setting)}\n",
        f"Quality loss as {loss_title(page.rows_of(model))} by heavy ratio ρ; best in bold:\n",
        table(head, body),
    ]
    bands = [
        band
        for c in mine.values()
        for a in c.values()
        for b in c.values()
        if a.run_id < b.run_id and (band := noise_between(a, b)) is not None
    ]
    if bands:
        md.append(
            "Probe accuracies: the best ρ is picked on point estimates; differences "
            f"between two ratios below about ±{fmt_points(statistics.median(bands))} "
            "(median noise band of these pairs) are probe noise.\n"
        )
    for series in SPLIT_SERIES:
        rho, used = best_ratio_overall(page.curves, model, series, setting)
        if rho is not None:
            md.append(
                f"- best ρ for {SERIES_TITLES[series]} over {used} budget(s) (mean rank): **{rho:g}**"
            )
    return [*md, ""]


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def _heavy_ratio_chart(
    curves: Mapping[CurveKey, Mapping[float, Row]],
    uniform: Mapping[tuple[str, float], Row],
    title: str,
    out: Path,
) -> Path:
    """Quality loss vs heavy ratio per split family and budget; the uniform baseline at ρ = 0."""
    from reports.plots import LossCurve, loss_chart

    lines, shown = [], []
    budgets = sorted({key[3] for key in curves})
    for (_, _, series, budget), curve in sorted(curves.items(), key=lambda kv: kv[0][2:]):
        xs, ys = list(curve), [r.loss for r in curve.values()]
        base = uniform.get((series, budget))  # FFSplit series only
        if base is not None:
            xs, ys = [0.0, *xs], [base.loss, *ys]
        shown += list(curve.values())
        shade = budgets.index(budget) / max(1, len(budgets) - 1)
        lines.append(
            LossCurve(
                f"{SERIES_TITLES[series]}, budget {fmt_budget(budget)}",
                xs,
                ys,
                "-" if series in FFSPLIT_SERIES else "--",
                0.1 + 0.75 * shade,
                "o" if series.endswith("lowrank") else "s",
            )
        )
    xlabel = "heavy ratio ρ (0 = uniform, no split)"
    return loss_chart(lines, out, title=title, xlabel=xlabel, **_loss_axis(shown))


def transfer_section(page: Page) -> list[str]:
    """Whether one model's best heavy ratio is best on another, and what using it costs there."""
    md = ["### Does the best heavy ratio transfer between models?\n"]
    moves = transfer(page.curves)
    if not moves:
        md.append(
            "Not measurable yet: no family and budget was swept over two or more common heavy "
            "ratios on two models.\n"
        )
        return md
    for series in SPLIT_SERIES:
        found = {}
        for model in page.models:
            for setting in settings(page.rows, model):
                rho, used = best_ratio_overall(page.curves, model, series, setting)
                if rho is not None:
                    found[model] = f"{rho:g} ({used} budgets)"
                    break
        if len(found) >= 2:
            same = len({v.split()[0] for v in found.values()}) == 1
            md.append(
                f"- {SERIES_TITLES[series]}, best ρ by mean rank over budgets: "
                + ", ".join(f"{m} {v}" for m, v in found.items())
                + (": the same on every model" if same else ": it differs between models")
            )
    exact = sum(t.transfers for t in moves)
    noisy = sum(1 for t in moves if t.within_noise)
    md += [
        "",
        f"The best ρ on one model is also the best on the other in {exact} of {len(moves)} "
        "comparisons (same family, budget and common ratios)"
        + (
            f"; in {noisy} more the extra loss on the other is within its probe noise"
            if noisy
            else ""
        )
        + "; the cost of using it there:\n",
    ]
    head = (
        "method",
        "budget",
        "from model",
        "to model",
        "best ρ on from",
        "best ρ on to",
        "rank of from's best on to",
        "extra loss on to (pp)",
    )
    body = [
        (
            SERIES_TITLES[t.series],
            fmt_budget(t.budget),
            t.source,
            t.target,
            f"{t.source_best:g}",
            f"{t.target_best:g}",
            f"{t.rank_on_target} of {t.candidates}",
            f"{t.extra_loss:.2f}"
            + (
                f" (within noise ±{fmt_points(t.band)})"
                if t.within_noise and t.band is not None
                else ""
            ),
        )
        for t in moves
    ]
    md.append(table(head, body))
    return md


# ------------------------------------------------------------------------- goals, healing, all


def goals_section(page: Page) -> list[str]:
    """The 43.1% size goals (FFN bytes, FFN parameters) at +1% perplexity, per causal LM."""
    md = [
        "## Goals\n",
        f"Per causal LM: the best variant with at least {100 * GOAL_REDUCTION:.1f}% smaller FFN "
        f"(bytes), and the best low-rank or pruned variant with at least {100 * GOAL_REDUCTION:.1f}% "
        f"fewer FFN parameters (healed or not); goal: perplexity at most +{GOAL_QUALITY_PCT:g}%.\n",
    ]
    goal_list = goals(page.rows)
    if not goal_list:
        md.append("No causal-LM runs yet.\n")
        return md

    def line(g: Goal) -> tuple[str, ...]:
        b = g.best
        reached = (
            ("none reaches the size", "-", "-", "-", "-")
            if b is None
            else (
                f"{b.label} ({SERIES_TITLES.get(b.series, b.series)})",
                fmt_loss(b.loss),
                fmt_pct(b.ffn_reduction),
                fmt_pct(b.ffn_param_reduction),
                "yes" if b.healed else "no",
            )
        )
        return (
            g.model,
            "FFN bytes" if g.goal == "ffn_bytes" else "FFN parameters",
            *reached,
            "yes" if g.met else "**no**",
            "-"
            if g.best_ffsplit is None
            else f"{g.best_ffsplit.label} {fmt_loss(g.best_ffsplit.loss)}",
        )

    head = ("model", "goal", "best variant", "loss", "FFN bytes cut", "FFN params cut")
    head += ("healed", "met?", "best FFSplit variant")
    md.append(table(head, [line(g) for g in goal_list]))
    return md


def healing_section(page: Page) -> list[str]:
    """Each recipe run both without and with healing: the loss before and after."""
    md = ["## Healing\n"]
    pairs = healing_pairs(page.rows)
    if not pairs:
        md.append("No recipe was run both with and without healing yet.\n")
        return md
    head = ("model", "recipe", "without", "with", "heal steps", "heal s", "change (pp)")
    body = [
        (
            a.model,
            a.label + (f" [{a.setting}]" if a.setting else ""),
            fmt_loss(a.loss),
            fmt_loss(b.loss),
            str(b.heal_steps),
            fmt_number(b.metrics.get("heal_seconds"), "{:.1f}"),
            f"{b.loss - a.loss:+.2f}{_noise_note(a, b)}",
        )
        for a, b in pairs
    ]
    md.append(table(head, body))
    return md


def _noise_note(a: Row, b: Row) -> str:
    """The healing table's note on an accuracy change: within noise (with its band), n unknown,
    or nothing (perplexity, or a difference beyond the noise)."""
    if "accuracy" not in (a.quality_kind, b.quality_kind):
        return ""
    band = noise_between(a, b)
    if band is None:
        return " (n unknown: noise not judged)"
    return f" (within noise ±{fmt_points(band)})" if within_noise(a, b) else ""


VARIANT_COLUMNS = (
    "variant",
    "setting",
    "family",
    "quality",
    "loss",
    "FFN bytes cut",
    "FFN params cut",
    "model cut",
    "prefill x",
    "decode x",
    "profile s",
    "compress s",
    "flow",
    "run",
    "model version",
)


def variants_section(page: Page) -> list[str]:
    """Every variant of every model, with its numbers, flow, run and model version."""

    def line(r: Row) -> tuple[str, ...]:
        metric = r.metrics.get
        return (
            r.label,
            r.setting or "-",
            SERIES_TITLES.get(r.series, r.series),
            fmt_quality(r),
            fmt_loss(r.loss),
            fmt_pct(r.ffn_reduction),
            fmt_pct(r.ffn_param_reduction),
            fmt_pct(r.model_reduction),
            fmt_number(metric("prefill_speedup"), "{:.2f}"),
            fmt_number(metric("decode_speedup"), "{:.2f}"),
            fmt_number(metric("profile_seconds"), "{:.1f}"),
            fmt_number(metric("compress_seconds"), "{:.1f}"),
            r.flow or "-",
            f"`{r.run_id}`",
            r.version or "-",
        )

    md = ["## All variants\n"]
    for model in page.models:
        md += [f"### {model}\n", table(VARIANT_COLUMNS, [line(r) for r in page.rows_of(model)])]
    return md


def provenance_section(page: Page, generated_at: datetime) -> list[str]:
    """Where every number came from: store, experiments, code versions, flows, run folders,
    commands and observation runs."""
    rows, source = page.rows, page.source
    commits = sorted({r.git_commit for r in rows if r.git_commit})
    flows_seen = sorted({r.flow for r in rows if r.flow})
    md = [
        "## Provenance\n",
        f"- MLflow tracking URI: {source.uri}",
        "- experiments: " + ", ".join(f"`{name}` (id {eid})" for name, eid in source.experiments),
        "- code versions (git commit of the variants): "
        + (", ".join(f"`{c[:12]}`" for c in commits) or "not logged"),
        "- flows: " + (", ".join(flows_seen) or "not tagged"),
    ]
    folders = sorted({(r.run_dir, r.command) for r in rows if r.run_dir or r.command})
    if folders:
        md.append("- sweep run folders and commands:")
        md += [f"  - `{folder or '?'}`: `{cmd or 'command not logged'}`" for folder, cmd in folders]
    else:
        md.append(
            f"- sweep run folders and commands: not logged by the runs (tags `{RUN_DIR_TAG}`, "
            f"`{COMMAND_TAG}`)"
        )
    md += _observation_provenance(source)
    return [*md, f"- generated: {generated_at.strftime('%Y-%m-%d %H:%M:%S UTC')}", ""]


def _observation_provenance(source: Source) -> list[str]:
    if not source.observations:
        return ["- observation runs: none"]
    md = ["- observation runs (the latest complete one per model):"]
    for obs in source.observations:
        commit = obs.params.get("git_commit", "")
        computed = obs.params.get("command", "")
        md.append(
            f"  - {obs.model}: run `{obs.run_id}` in `{obs.experiment}`, code "
            f"`{commit[:12] or 'not logged'}`, computed by `{computed or 'not logged'}`"
            + (f", logged by `{obs.command}`" if obs.command and obs.command != computed else "")
            + (f" (folder `{obs.run_dir}`)" if obs.run_dir else "")
        )
    return md
