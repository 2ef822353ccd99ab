"""docs/results.md from the MLflow runs of the project's flows (issue 6): never typed by hand.

Reading (`read_rows`) is the only part that talks to MLflow: every complete, FINISHED run of the
experiments 'ffsplit/<base model>' becomes a plain `Row` (recipe from the run's params, metrics as
logged, tags), deduplicated by variant key (the same variant registered by two sweeps counts once;
the latest run wins). Everything else is pure functions of rows: the dense references, the
trade-off at equal FFN budget against every baseline (method.md, "Baselines that a result must
beat"), the places where FFSplit does not beat a baseline, the heavy-ratio sweep and whether its
best ratio transfers between models, the goals check, healing pairs, provenance, plots and the page.

Quality loss is the logged perplexity_change_pct (perplexity increase over the dense model of the
same sweep's evaluation, in %), or minus accuracy_change_pct for encoders (tracking.registry's
quality_loss); lower is better. Sizes that the sweep does not log are derived from the model's
dense run: whole-model size reduction = 1 - bytes / dense bytes; FFN parameter reduction =
(dense parameters - parameters) / dense FFN parameters, with dense FFN parameters = dense FFN bytes
/ 2 (every dense float weight counts 2 bytes, ffsplit/eval/size.py), since only the FFN changes.

Probe noise: an encoder's accuracy is a linear probe's on n labelled test examples, so it carries a
binomial standard error sqrt(p(1-p)/n) (about 1.3 points for MiniLM's 1500 tweets). Accuracy cells
show p ± 1.96 se, and two accuracies whose difference is below 1.96 sqrt(se_a^2 + se_b^2) are
"within noise": neither a win nor a loss (`compare`). n is the run's metric accuracy_test_examples,
else record["eval"]["test"] of its eval/record.json artifact, else unknown (and then not judged).
Perplexity is compared as logged: the evaluation text is fixed and the number is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ffsplit.config import Recipe
from ffsplit.errors import FFSplitError
from ffsplit.variant.manifest import flat_params
from tracking.registry import (
    COMPLETE_TAG,
    EXPERIMENT_PREFIX,
    ROLE_TAG,
    quality_loss,
    redact,
)

# The paper's headline size cut (method.md: "43.1% smaller model"); our goal asks it of the FFN.
GOAL_REDUCTION = 0.431
# Achieved reductions are rounded by the budget solver: 43.05% and up reads as 43.1%.
GOAL_TOLERANCE = 0.0005
GOAL_QUALITY_PCT = 1.0  # at most +1% perplexity (issue 6)
# Two variants "save the same bytes" when their achieved FFN reductions differ by at most this.
EQUAL_BYTES_TOLERANCE = 0.005
DEFAULT_HEAVY_RATIO = Recipe().heavy_ratio  # the sweep's default (flows.sweep.DEFAULT_HEAVY_RATIOS)
FLOAT_BYTES = 2  # ffsplit/eval/size.py: dense float weights count 16 bits
RUN_DIR_TAG = "ffsplit.run_dir"
COMMAND_TAG = "ffsplit.command"
# Probe accuracy's test-set size: logged by tasks.evaluate.metrics, else in the evaluation record.
TEST_EXAMPLES_METRIC = "accuracy_test_examples"
RECORD_ARTIFACT = "eval/record.json"  # flows.sweep / flows.compress log ffsplit.jobs' record here
Z95 = 1.96  # two-sided 95% normal quantile: intervals and the noise rule
# Recipe fields that place a variant on the grid; every other recipe field is its "setting".
GRID_KEYS = ("method", "heavy_ratio", "ffn_reduction", "selection", "seed", "version")

FFSPLIT_SERIES = ("ffsplit-lowrank", "ffsplit-quant")
BASELINE_SERIES = ("uniform-lowrank", "uniform-quant", "random-lowrank", "random-quant", "prune")
SERIES_TITLES = {
    "ffsplit-lowrank": "FFSplit low-rank",
    "ffsplit-quant": "FFSplit quant",
    "uniform-lowrank": "uniform low-rank",
    "uniform-quant": "uniform quant",
    "random-lowrank": "random split low-rank",
    "random-quant": "random split quant",
    "prune": "score pruning",
    "prune-random": "random pruning",
    "dense": "dense",
}
SERIES_COLORS = {
    "ffsplit-lowrank": "tab:blue",
    "ffsplit-quant": "tab:red",
    "uniform-lowrank": "tab:cyan",
    "uniform-quant": "tab:orange",
    "random-lowrank": "tab:purple",
    "random-quant": "tab:pink",
    "prune": "tab:gray",
}
SERIES_MARKERS = {"ffsplit-lowrank": "o", "ffsplit-quant": "s", "prune": "x"}
# Like-for-like baselines of each FFSplit method (same compressor, or the pruning end of the range).
MATCHED_BASELINES = {
    "ffsplit-lowrank": ("uniform-lowrank", "random-lowrank", "prune"),
    "ffsplit-quant": ("uniform-quant", "random-quant", "prune"),
}


@dataclass(frozen=True)
class Row:
    """One registered variant (or dense reference) as the page sees it."""

    model: str
    run_id: str
    label: str
    series: str
    method: str
    heavy_ratio: float
    budget: float  # the recipe's target FFN reduction (fraction of FFN bytes)
    metrics: Mapping[str, float] = field(default_factory=dict)
    setting: str = ""  # non-default recipe options, "" for the defaults (healing included)
    heal_steps: int = 0
    selection: str = "score"
    start_time: int = 0  # ms since the epoch (MLflow run start)
    experiment: str = ""
    version: str = ""  # "name vN" of its registered model version, "" if none
    flow: str = ""
    variant_key: str = ""
    git_commit: str = ""
    run_dir: str = ""  # the flow's run folder, else the record folder that was logged
    command: str = ""  # the command that logged the run (params["command"] computed the record)
    test_examples: int | None = None  # accuracy rows: the probe's test-set size n, None = unknown
    # Filled by with_reference from the model's dense row:
    loss: float | None = None  # quality loss in % (perplexity increase, or accuracy drop)
    model_reduction: float | None = None
    ffn_param_reduction: float | None = None

    @property
    def is_dense(self) -> bool:
        return self.series == "dense"

    @property
    def healed(self) -> bool:
        return self.heal_steps > 0

    @property
    def ffn_reduction(self) -> float | None:
        """Achieved FFN byte reduction (logged), not the target budget."""
        return _finite(self.metrics.get("ffn_reduction"))

    @property
    def quality_kind(self) -> str:
        return "perplexity" if "perplexity" in self.metrics else "accuracy"

    @property
    def quality(self) -> float | None:
        return _finite(self.metrics.get(self.quality_kind))

    @property
    def accuracy_stderr(self) -> float | None:
        """Binomial standard error sqrt(p(1-p)/n) of a probe accuracy; None for perplexity rows
        and where n is unknown."""
        p = self.quality
        if self.quality_kind != "accuracy" or p is None or not self.test_examples:
            return None
        return math.sqrt(max(p * (1.0 - p), 0.0) / self.test_examples)


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _count(value: Any) -> int | None:
    """A positive whole number (a test-set size), else None."""
    number = _finite(value)
    if number is None or number < 1 or number != int(number):
        return None
    return int(number)


def record_test_examples(record: Any) -> int | None:
    """record["eval"]["test"] of an evaluation record (ffsplit.jobs.evaluate_job), None if the
    record has no positive whole test-set size."""
    evaluation = record.get("eval") if isinstance(record, Mapping) else None
    return _count(evaluation.get("test")) if isinstance(evaluation, Mapping) else None


# ------------------------------------------------------------------------------- rows from runs


def series_for(method: str, heavy_ratio: float, selection: str) -> str:
    """Family of a recipe (flows.compress.series_of, with random pruning kept apart from score
    pruning, which is the baseline)."""
    if method == "none":
        return "dense"
    if method == "prune":
        return "prune" if selection == "score" else "prune-random"
    if heavy_ratio == 0:
        return f"uniform-{method}"
    if selection == "random":
        return f"random-{method}"
    return f"ffsplit-{method}"


def heal_steps_of(params: Mapping[str, str]) -> int:
    """Healing steps of a recipe, read defensively: any param like 'recipe.heal.steps' or
    'heal.steps' (or '...heal_steps'); 0 when absent or not a number."""
    for key, value in sorted(params.items()):
        k = key.lower()
        if re.fullmatch(r"(recipe\.)?heal[._]\w*steps", k):
            try:
                return max(0, int(float(value)))
            except (TypeError, ValueError):
                continue
    return 0


_DEFAULT_PARAMS = flat_params({"recipe": Recipe().to_dict()})


def setting_of(params: Mapping[str, str], *, with_heal: bool = True) -> str:
    """The recipe's options other than its place on the grid, as 'key=value, ...' where they differ
    from the defaults ("" = defaults). Missing keys (older runs) count as defaults."""
    grid = {f"recipe.{k}" for k in GRID_KEYS}
    healed = heal_steps_of(params) > 0
    out = []
    for key in sorted(params):
        if not key.startswith("recipe.") or key in grid or key.endswith(".version"):
            continue
        if key.startswith("recipe.heal") and not (with_heal and healed):
            continue  # no healing (steps 0 or absent) reads the same whatever else heal holds
        if _DEFAULT_PARAMS.get(key) == params[key]:
            continue
        out.append(f"{key[len('recipe.') :]}={params[key]}")
    return ", ".join(out)


def row_from_run(
    *,
    model: str,
    run_id: str,
    run_name: str,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    start_time: int = 0,
    experiment: str = "",
    version: str = "",
) -> Row:
    """A Row from one run's params (the flattened manifest), metrics and tags."""

    def num(key: str, default: float) -> float:
        try:
            return float(params.get(key, default))
        except (TypeError, ValueError):
            return default

    method = params.get("recipe.method", "")
    heavy = num("recipe.heavy_ratio", 0.0)
    selection = params.get("recipe.selection", "score")
    if method:
        series = series_for(method, heavy, selection)
    else:  # a run without recipe params: trust its tags
        series = tags.get("ffsplit.series") or ("dense" if tags.get(ROLE_TAG) == "dense" else "")
    if tags.get(ROLE_TAG) == "dense":
        series = "dense"
    return Row(
        model=model,
        run_id=run_id,
        label=run_name or run_id,
        series=series,
        method=method or ("none" if series == "dense" else ""),
        heavy_ratio=heavy,
        budget=num("recipe.ffn_reduction", 0.0),
        metrics={k: float(v) for k, v in metrics.items()},
        setting=setting_of(params),
        heal_steps=heal_steps_of(params),
        selection=selection,
        start_time=int(start_time or 0),
        experiment=experiment,
        version=version,
        flow=tags.get("ffsplit.flow", ""),
        variant_key=tags.get("ffsplit.variant_key") or tags.get("ffsplit.content_sha256", ""),
        git_commit=params.get("git_commit", ""),
        run_dir=tags.get(RUN_DIR_TAG, ""),
        command=tags.get(COMMAND_TAG, ""),
        test_examples=_count(metrics.get(TEST_EXAMPLES_METRIC)),
    )


def dedupe(rows: Iterable[Row]) -> tuple[list[Row], int]:
    """(rows with one per model and variant key, the latest run; how many were dropped)."""
    best: dict[tuple[str, str], Row] = {}
    count = 0
    for row in rows:
        count += 1
        key = (row.model, row.variant_key or row.run_id)
        old = best.get(key)
        if old is None or (row.start_time, row.run_id) > (old.start_time, old.run_id):
            best[key] = row
    kept = sorted(best.values(), key=_order)
    return kept, count - len(kept)


def _order(row: Row) -> tuple:
    families = ("dense", *FFSPLIT_SERIES, *BASELINE_SERIES, "prune-random")
    rank = families.index(row.series) if row.series in families else len(families)
    return (row.model, row.setting, row.budget, rank, row.heavy_ratio, row.label, row.run_id)


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
        m, d = row.metrics, (ref.metrics if ref is not None else {})
        loss = 0.0 if row.is_dense else quality_loss(m)
        if loss is None and row.quality is not None and _finite(d.get(row.quality_kind)):
            ratio = row.quality / float(d[row.quality_kind])
            loss = 100.0 * (ratio - 1) if row.quality_kind == "perplexity" else -100.0 * (ratio - 1)
        model_red = _first(m, ("model_reduction", "model_size_reduction", "size_reduction"))
        if model_red is None and _finite(m.get("bytes")) and _finite(d.get("bytes")):
            model_red = 1.0 - m["bytes"] / d["bytes"]
        param_red = _first(m, ("ffn_param_reduction", "ffn_params_reduction"))
        if param_red is None and None not in (
            _finite(m.get("ffn_params")),
            _finite(d.get("ffn_params")),
        ):
            param_red = 1.0 - m["ffn_params"] / d["ffn_params"] if d["ffn_params"] else None
        if (
            param_red is None
            and _finite(m.get("parameters")) is not None
            and _finite(d.get("parameters")) is not None
            and _finite(d.get("ffn_bytes")) is not None
        ):
            dense_ffn_params = d["ffn_bytes"] / FLOAT_BYTES
            if dense_ffn_params > 0:
                param_red = (d["parameters"] - m["parameters"]) / dense_ffn_params
        out.append(
            dataclasses.replace(
                row, loss=loss, model_reduction=model_red, ffn_param_reduction=param_red
            )
        )
    return out


def _first(metrics: Mapping[str, float], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = _finite(metrics.get(key))
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------- reading MLflow


@dataclass(frozen=True)
class Source:
    """Where the rows came from (the page's provenance)."""

    uri: str  # redacted
    experiments: tuple[tuple[str, str], ...]  # (name, id)
    runs_read: int
    incomplete: int
    duplicates: int
    # The latest complete observation run of each model (tasks.observation), by model name.
    observations: tuple[ObservationRun, ...] = ()


@dataclass(frozen=True)
class ObservationRun:
    """One model's latest complete observation run (tasks.observation.log_observation): its
    scalar metrics, per-layer series (metric steps = layer index) and plot files."""

    model: str
    run_id: str
    experiment: str = ""
    start_time: int = 0
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    series: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    plots: Mapping[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    run_dir: str = ""  # the flow's run folder, else the record folder that was logged
    command: str = ""  # the command that logged the run (params["command"] computed the record)


def _fail(what: str, uri: str, exc: BaseException) -> FFSplitError:
    text = str(exc).strip().splitlines()
    return FFSplitError(
        f"{what} in {redact(uri)} failed: {redact(text[0] if text else type(exc).__name__)[:300]}"
    )


def _paged(call: Any) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = call(token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def read_rows(uri: str, models: Sequence[str] | None = None) -> tuple[list[Row], Source]:
    """Complete, FINISHED runs of the ffsplit experiments (all, or those of `models`) as rows,
    deduplicated by variant key. Observation runs (tag ffsplit.role=observation) are not variants:
    the latest complete one of each model goes to Source.observations instead. Raises
    FFSplitError (one line) for unknown models or no runs."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from tracking.observation import OBSERVATION_ROLE

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiments = _paged(
            lambda token: client.search_experiments(
                filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'", page_token=token
            )
        )
    except Exception as exc:
        raise _fail("listing experiments", uri, exc) from None
    by_name = {e.name[len(EXPERIMENT_PREFIX) :]: e for e in experiments}
    if models:
        lower = {k.lower(): k for k in by_name}
        missing = [m for m in models if m.lower() not in lower]
        if missing:
            raise FFSplitError(
                f"no ffsplit experiment for {', '.join(missing)} in {redact(uri)}; it has "
                f"{', '.join(sorted(by_name)) or 'none'} (run a sweep first: python -m flows.sweep run)"
            )
        chosen = [by_name[lower[m.lower()]] for m in models]
    else:
        chosen = [by_name[k] for k in sorted(by_name)]
    if not chosen:
        raise FFSplitError(
            f"no ffsplit experiments (named {EXPERIMENT_PREFIX}<model>) in {redact(uri)}: run a "
            "sweep first (python -m flows.sweep run --model ...) or point --tracking-uri at its store"
        )
    try:
        versions: dict[str, str] = {}
        for mv in _paged(
            lambda token: client.search_model_versions(max_results=1000, page_token=token)
        ):
            if (mv.tags or {}).get(COMPLETE_TAG) == "true":
                versions.setdefault(mv.run_id, f"{mv.name} v{mv.version}")
        rows, read, incomplete = [], 0, 0
        observed: dict[str, tuple[Any, str]] = {}
        for exp in chosen:
            runs = _paged(
                lambda token, exp=exp: client.search_runs(
                    [exp.experiment_id],
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=1000,
                    page_token=token,
                )
            )
            for run in runs:
                read += 1
                tags = run.data.tags
                if run.info.status != "FINISHED" or tags.get(COMPLETE_TAG) != "true":
                    incomplete += 1
                    continue
                if tags.get(ROLE_TAG) == OBSERVATION_ROLE:  # not a variant: its own section
                    model = tags.get("ffsplit.base_model") or exp.name[len(EXPERIMENT_PREFIX) :]
                    old = observed.get(model)
                    if old is None or _run_order(run) > _run_order(old[0]):
                        observed[model] = (run, exp.name)
                    continue
                rows.append(
                    row_from_run(
                        model=tags.get("ffsplit.base_model") or exp.name[len(EXPERIMENT_PREFIX) :],
                        run_id=run.info.run_id,
                        run_name=run.info.run_name or "",
                        params=run.data.params,
                        metrics=run.data.metrics,
                        tags=tags,
                        start_time=run.info.start_time or 0,
                        experiment=exp.name,
                        version=versions.get(run.info.run_id, ""),
                    )
                )
    except FFSplitError:
        raise
    except Exception as exc:
        raise _fail("reading runs", uri, exc) from None
    kept, dropped = dedupe(rows)
    if not kept and not observed:
        raise FFSplitError(
            f"no complete ffsplit runs in {', '.join(e.name for e in chosen)} at {redact(uri)} "
            f"({read} runs, {incomplete} incomplete): run a sweep first (python -m flows.sweep run)"
        )
    try:
        kept = _with_record_test_examples(client, kept)
    except Exception as exc:
        raise _fail(f"reading {RECORD_ARTIFACT} artifacts", uri, exc) from None
    try:
        observations = tuple(
            _observation_run(client, model, *observed[model]) for model in sorted(observed)
        )
    except Exception as exc:
        raise _fail("reading observation runs", uri, exc) from None
    source = Source(
        redact(uri),
        tuple((e.name, str(e.experiment_id)) for e in chosen),
        read,
        incomplete,
        dropped,
        observations,
    )
    return with_reference(kept), source


def _run_order(run: Any) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_id)


def _observation_run(client: Any, model: str, run: Any, experiment: str) -> ObservationRun:
    """An observation run with its per-layer series (metric histories) and plot files."""
    from tracking.observation import PLOTS_ARTIFACT_DIR, SERIES

    run_id = run.info.run_id
    names = [name for name, _, _ in SERIES]
    names += sorted(k for k in run.data.metrics if re.fullmatch(r"jaccard_\d+pct", k))
    series: dict[str, dict[int, float]] = {}
    for name in names:
        points = sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp)
        if points:
            series[name] = {int(m.step): float(m.value) for m in points}  # latest wins
    plots: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="ffsplit-results-") as tmp:
        for item in client.list_artifacts(run_id, PLOTS_ARTIFACT_DIR):
            if item.is_dir or not item.path.endswith(".png"):
                continue
            local = Path(client.download_artifacts(run_id, item.path, tmp))
            plots[Path(item.path).name] = local.read_bytes()
    tags = run.data.tags
    return ObservationRun(
        model=model,
        run_id=run_id,
        experiment=experiment,
        start_time=int(run.info.start_time or 0),
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        series=series,
        plots=plots,
        run_dir=tags.get(RUN_DIR_TAG, "") or tags.get("ffsplit.record_dir", ""),
        command=tags.get(COMMAND_TAG, ""),
    )


def _with_record_test_examples(client: Any, rows: Sequence[Row]) -> list[Row]:
    """Accuracy rows without the test-set size metric (runs older than it) get n from their
    eval/record.json artifact; a run without that artifact, or with an unreadable one, keeps n
    unknown. Only those runs are downloaded."""
    out = []
    with tempfile.TemporaryDirectory(prefix="ffsplit-results-") as tmp:
        for index, row in enumerate(rows):
            if row.quality_kind != "accuracy" or row.quality is None or row.test_examples:
                out.append(row)
                continue
            folder = RECORD_ARTIFACT.rsplit("/", 1)[0]
            if RECORD_ARTIFACT not in {f.path for f in client.list_artifacts(row.run_id, folder)}:
                out.append(row)
                continue
            dst = Path(tmp) / str(index)
            dst.mkdir()
            local = Path(client.download_artifacts(row.run_id, RECORD_ARTIFACT, str(dst)))
            try:
                record = json.loads(local.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = None
            out.append(dataclasses.replace(row, test_examples=record_test_examples(record)))
    return out


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
        out.append(
            BudgetLine(
                model,
                setting,
                budget,
                cells,
                top,
                verdict,
                beaten_by,
                tuple(s for s in BASELINE_SERIES if s not in present),
                versus,
            )
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
            if column.series not in FFSPLIT_SERIES or line.cells[column] is None:
                continue
            mine = line.cells[column]
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


# ------------------------------------------------------------------------------ heavy-ratio sweep

CurveKey = tuple[str, str, str, float]  # (model, setting, series, budget)


def heavy_ratio_curves(rows: Iterable[Row]) -> dict[CurveKey, dict[float, Row]]:
    """Quality vs heavy ratio: per (model, setting, split family, budget), ρ -> best variant."""
    groups: dict[CurveKey, dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (
            row.series in (*FFSPLIT_SERIES, "random-lowrank", "random-quant")
            and row.heavy_ratio > 0
        ):
            key = (row.model, row.setting, row.series, round(row.budget, 6))
            groups[key][round(row.heavy_ratio, 6)].append(row)
    out = {}
    for key, by_rho in groups.items():
        picked = {rho: best(rs) for rho, rs in by_rho.items()}
        out[key] = {rho: r for rho, r in sorted(picked.items()) if r is not None}
    return out


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
                if a == b:
                    continue
                common = set(by_model[a]) & set(by_model[b])
                if len(common) < 2:
                    continue
                ca = {rho: by_model[a][rho] for rho in common}
                cb = {rho: by_model[b][rho] for rho in common}
                best_a, best_b = best_ratio(ca), best_ratio(cb)
                out.append(
                    Transfer(
                        series,
                        budget,
                        a,
                        b,
                        best_a,
                        best_b,
                        ranks(cb)[best_a],
                        len(common),
                        cb[best_a].loss - cb[best_b].loss,
                        within_noise(cb[best_a], cb[best_b]) if best_a != best_b else None,
                        noise_between(cb[best_a], cb[best_b]) if best_a != best_b else None,
                    )
                )
    return out


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


# --------------------------------------------------------------------------------------- format


def fmt_loss(loss: float | None) -> str:
    if loss is None:
        return "-"
    return f"{loss:+.0f}%" if abs(loss) >= 100 else f"{loss:+.2f}%"


def fmt_pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def fmt_quality(row: Row) -> str:
    """Perplexity as logged; a probe accuracy with its 95% interval (or "n unknown")."""
    q = row.quality
    if q is None:
        return "-"
    if row.quality_kind == "perplexity":
        return f"ppl {q:.2f}"
    se = row.accuracy_stderr
    return f"acc {q:.4f} (n unknown)" if se is None else f"acc {q:.3f} ±{Z95 * se:.3f}"


def fmt_points(fraction: float) -> str:
    """An accuracy difference (a fraction) in percentage points."""
    return f"{100 * fraction:.1f} pt"


def noise_note(a: Row, b: Row) -> str:
    """The healing table's note on an accuracy change: within noise (with its band), n unknown,
    or nothing (perplexity, or a difference beyond the noise)."""
    if "accuracy" not in (a.quality_kind, b.quality_kind):
        return ""
    band = noise_between(a, b)
    if band is None:
        return " (n unknown: noise not judged)"
    return f" (within noise ±{fmt_points(band)})" if within_noise(a, b) else ""


def fmt_budget(budget: float) -> str:
    return f"{100 * budget:.1f}%".replace(".0%", "%")


def _loss_title(rows: Iterable[Row]) -> str:
    kinds = {r.quality_kind for r in rows}
    if kinds == {"accuracy"}:
        return "accuracy drop vs dense, %"
    return "perplexity increase vs dense, %"


def _table(head: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _setting_text(setting: str) -> str:
    return setting if setting else "default recipe options"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"


# ----------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    from ffsplit.files import atomic_path

    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return out


def _loss_axis(ax: Any, rows: Sequence[Row]) -> None:
    ax.set_yscale("symlog", linthresh=1.0)
    lowest = min((r.loss for r in rows if r.loss is not None), default=0.0)
    ax.set_ylim(bottom=min(-0.05, 1.2 * lowest))
    ax.set_ylabel(f"{_loss_title(rows)} (symlog)")
    if any(r.quality_kind == "perplexity" for r in rows):
        ax.axhline(GOAL_QUALITY_PCT, color="grey", lw=0.8, ls=":", label="goal: +1% perplexity")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.grid(alpha=0.3)


def tradeoff_plot(lines: Sequence[BudgetLine], title: str, out: Path) -> Path:
    """Quality loss vs achieved FFN reduction, one line per method and baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shown: list[Row] = []
    for column in COLUMNS:
        points = sorted(
            (r.ffn_reduction, r.loss)
            for line in lines
            if (r := line.cells[column]) is not None and r.ffn_reduction is not None
        )
        if not points:
            continue
        shown += [line.cells[column] for line in lines if line.cells[column] is not None]
        xs, ys = zip(*points, strict=True)
        style = "-" if column.series in FFSPLIT_SERIES else "--"
        if column.heavy_ratio is not None:
            style = ":"
        ax.plot(
            [100 * x for x in xs],
            ys,
            style,
            color=SERIES_COLORS.get(column.series),
            marker=SERIES_MARKERS.get(column.series, "o"),
            ms=4,
            label=column.title,
        )
    ax.plot([0], [0], "k*", ms=9, label="dense")
    ax.set_xlim(left=0)
    ax.set_xlabel("achieved FFN reduction (% of FFN bytes)")
    _loss_axis(ax, shown)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out)


def heavy_ratio_plot(
    curves: Mapping[CurveKey, Mapping[float, Row]],
    uniform: Mapping[tuple[str, float], Row],
    title: str,
    out: Path,
) -> Path:
    """Quality loss vs heavy ratio per split family and budget; the uniform baseline at ρ = 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shown: list[Row] = []
    budgets = sorted({key[3] for key in curves})
    cmap = plt.get_cmap("viridis")
    for (_, _, series, budget), curve in sorted(curves.items(), key=lambda kv: kv[0][2:]):
        xs = list(curve)
        ys = [curve[x].loss for x in xs]
        method = series.split("-", 1)[1]
        base = uniform.get((method, budget))
        if base is not None and series in FFSPLIT_SERIES:
            xs, ys = [0.0, *xs], [base.loss, *ys]
        shown += list(curve.values())
        style = "-" if series in FFSPLIT_SERIES else "--"
        name = f"{SERIES_TITLES[series]}, budget {fmt_budget(budget)}"
        shade = budgets.index(budget) / max(1, len(budgets) - 1)
        color = cmap(0.1 + 0.75 * shade)
        marker = "o" if series.endswith("lowrank") else "s"
        ax.plot(xs, ys, style, color=color, marker=marker, ms=4, label=name)
    ax.set_xlabel("heavy ratio ρ (0 = uniform, no split)")
    _loss_axis(ax, shown)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out)


# ------------------------------------------------------------------------------------------ page


def _settings(rows: Sequence[Row], model: str) -> list[str]:
    """Settings of a model's variants, the one with most variants first."""
    count: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.model == model and not r.is_dense:
            count[r.setting] += 1
    return sorted(count, key=lambda s: (-count[s], s))


def _cell_text(row: Row | None, show_rho: bool) -> str:
    if row is None:
        return "-"
    text = f"{fmt_loss(row.loss)} ({fmt_quality(row)})"
    if show_rho:
        text += f" ρ {row.heavy_ratio:g}"
    return text


def _verdict_text(line: BudgetLine) -> str:
    if line.beats_all is None:
        return "no comparison" if line.ffsplit is not None else "no FFSplit run"
    parts = []
    if line.beats_all:
        parts.append("yes")
    if line.beaten_by:
        parts.append("**no**: " + ", ".join(SERIES_TITLES[s] for s in line.beaten_by))
    if line.within_noise:
        bands = {s: fmt_points(line.versus[s].band or 0.0) for s in line.within_noise}
        names = [SERIES_TITLES[s] for s in line.within_noise]
        if len(set(bands.values())) == 1:
            parts.append(f"within noise (±{next(iter(bands.values()))}) of {', '.join(names)}")
        else:
            parts.append(
                "within noise of "
                + ", ".join(f"{SERIES_TITLES[s]} (±{b})" for s, b in bands.items())
            )
    if line.unjudged:
        parts.append(
            "not judged (test-set size unknown): "
            + ", ".join(SERIES_TITLES[s] for s in line.unjudged)
        )
    text = "; ".join(parts)
    if line.missing:
        text += f" (not run: {', '.join(SERIES_TITLES[s] for s in line.missing)})"
    return text


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


def render(
    rows: Sequence[Row],
    source: Source,
    generated_at: datetime,
    plots_dir: Path,
    plots_link: str,
    command: str,
) -> tuple[str, list[Path]]:
    """(the page's markdown, the plot files written into plots_dir). rows: with_reference'd."""
    models = sorted({r.model for r in rows})
    dense = dense_references(rows)
    curves = heavy_ratio_curves(rows)
    written: list[Path] = []
    md: list[str] = []
    add = md.append
    add("# Results: FFSplit against its baselines at equal FFN budget\n")
    add(
        "Generated from the MLflow runs of the project's flows by\n\n"
        f"```\n{command}\n```\n\n"
        "(it reads the experiments `ffsplit/<model>` of `MLFLOW_TRACKING_URI`, or of "
        "`--tracking-uri`, and rewrites this page and its plots in "
        f"`{plots_link}/`); do not edit by hand.\n"
    )
    add(
        f"Generated {generated_at.strftime('%Y-%m-%d %H:%M UTC')} from {source.uri}: "
        f"{len(rows)} variants of {len(models)} model(s) ({source.runs_read} runs read, "
        f"{source.incomplete} incomplete or failed skipped, {source.duplicates} duplicates of a "
        "variant dropped, the latest kept)"
        + (
            f"; the observation section shows {len(source.observations)} observation run(s).\n"
            if source.observations
            else ".\n"
        )
    )
    add(
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
    accuracy_rows = [r for r in rows if r.quality_kind == "accuracy" and r.quality is not None]
    if accuracy_rows:
        add(_noise_paragraph(accuracy_rows))

    lines_by_model = {m: tradeoff(rows, m) for m in models}
    all_lines = [line for m in models for line in lines_by_model[m]]
    falls = shortfalls(all_lines)
    goal_list = goals(rows)

    # ---- summary
    add("## Summary\n")
    for model in models:
        judged = [x for x in lines_by_model[model] if x.beats_all is not None]
        wins = [x for x in judged if x.beats_all]
        text = (
            f"- **{model}**: the best FFSplit variant beats every baseline run at {len(wins)} of "
            f"{len(judged)} budgets"
            if judged
            else f"- **{model}**: no budget has both an FFSplit run and a baseline run yet"
        )
        losses = [x for x in judged if x.beaten_by]
        if losses:
            text += "; not at " + "; ".join(
                f"{fmt_budget(x.budget)}{' [' + x.setting + ']' if x.setting else ''} "
                f"(beaten by {', '.join(SERIES_TITLES[s] for s in x.beaten_by)})"
                for x in losses
            )
        unclear = [x for x in judged if not x.beats_all and (x.within_noise or x.unjudged)]
        if unclear:
            text += "; no clear winner (within probe noise) against " + "; ".join(
                f"{', '.join(SERIES_TITLES[s] for s in (*x.within_noise, *x.unjudged))} at "
                f"{fmt_budget(x.budget)}{' [' + x.setting + ']' if x.setting else ''}"
                for x in unclear
            )
        for series in FFSPLIT_SERIES:
            mine = [x for x in lines_by_model[model] if x.cells[Column(series)] is not None]
            compared = [
                x
                for x in mine
                if any(x.cells[Column(b)] is not None for b in MATCHED_BASELINES[series])
            ]
            if not compared:
                continue
            failed = {
                (f.setting, f.budget)
                for f in falls
                if f.model == model and f.column == Column(series)
            }
            lost = {
                (f.setting, f.budget)
                for f in falls
                if f.model == model and f.column == Column(series) and f.outcome == "no"
            }
            ok = [x for x in compared if (x.setting, x.budget) not in failed]
            noisy = [x for x in compared if (x.setting, x.budget) in failed - lost]
            text += (
                f"; {SERIES_TITLES[series]} (best ρ) beats its matched baselines at {len(ok)} of "
                f"{len(compared)} budgets"
                + (
                    f" (at {len(noisy)} of them within probe noise of a baseline, not beaten)"
                    if noisy
                    else ""
                )
            )
        add(text + ".")
    for goal in goal_list:
        add("- " + _goal_sentence(goal))
    add("")

    # ---- dense references
    add("## Dense references\n")
    add(
        _table(
            ("model", "quality", "parameters", "bytes", "FFN bytes", "run", "model version"),
            [
                (
                    m,
                    fmt_quality(dense[m]),
                    f"{dense[m].metrics.get('parameters', math.nan) / 1e6:.1f} M",
                    f"{dense[m].metrics.get('bytes', math.nan) / 1e6:.1f} MB",
                    f"{dense[m].metrics.get('ffn_bytes', math.nan) / 1e6:.1f} MB",
                    f"`{dense[m].run_id}`",
                    dense[m].version or "-",
                )
                if m in dense
                else (m, "no dense run", "-", "-", "-", "-", "-")
                for m in models
            ],
        )
    )

    # ---- the observation
    text, pngs = observation_section(source.observations, models, plots_dir, plots_link)
    add(text)
    written += pngs

    # ---- trade-off
    add("## Trade-off at equal FFN budget\n")
    for model in models:
        for index, setting in enumerate(_settings(rows, model)):
            lines = [x for x in lines_by_model[model] if x.setting == setting]
            if not lines:
                continue
            kind = _loss_title(r for r in rows if r.model == model)
            add(f"### {model}: {_setting_text(setting)}\n")
            add(f"Quality loss as {kind} of the best run of each method per budget:\n")
            add(
                _table(
                    ("budget", *(c.title for c in COLUMNS), "best FFSplit beats every baseline?"),
                    [
                        (
                            fmt_budget(x.budget),
                            *(
                                _cell_text(
                                    x.cells[c], c.series in FFSPLIT_SERIES and c.heavy_ratio is None
                                )
                                for c in COLUMNS
                            ),
                            _verdict_text(x),
                        )
                        for x in lines
                    ],
                )
            )
            add("Achieved FFN byte reduction / whole-model size reduction of the same runs:\n")
            add(
                _table(
                    ("budget", *(c.title for c in COLUMNS)),
                    [
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
                    ],
                )
            )
            suffix = "" if index == 0 else f"-s{index + 1}"
            name = f"{slug(model)}-tradeoff{suffix}.png"
            written.append(
                tradeoff_plot(
                    lines,
                    f"{model}: quality loss vs FFN reduction ({_setting_text(setting)})",
                    plots_dir / name,
                )
            )
            add(f"![{model} trade-off]({plots_link}/{name})\n")

    # ---- shortfalls
    add("## Where FFSplit does not beat a baseline\n")
    if not falls:
        add(
            "Nowhere among the runs read: at every budget each FFSplit method (at its best ρ and "
            f"at ρ {DEFAULT_HEAVY_RATIO:g}) beats its matched baselines (same compressor uniform and "
            "random split, and score pruning) that were run.\n"
        )
    else:
        add(
            "Each FFSplit method against its matched baselines (the same compressor uniform and "
            "with a random split, and score pruning), at every budget where both were run"
            + (
                '; "within noise" is no loss either: the two accuracies differ by less than '
                "the probe's noise"
                if any(f.outcome != "no" for f in falls)
                else ""
            )
            + ":\n"
        )
        add(
            _table(
                ("model", "setting", "budget", "FFSplit", "run", "baseline", "run", "why"),
                [
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
                    for f in falls
                ],
            )
        )

    # ---- heavy-ratio sweep
    add("## Heavy-ratio sweep\n")
    uniform_groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.series.startswith("uniform-"):
            uniform_groups[(r.model, r.setting, r.method, round(r.budget, 6))].append(r)
    uniform = {k: b for k, v in uniform_groups.items() if (b := best(v)) is not None}
    any_curve = False
    for model in models:
        for index, setting in enumerate(_settings(rows, model)):
            mine = {k: c for k, c in curves.items() if k[0] == model and k[1] == setting}
            if not any(len(c) >= 2 for c in mine.values()):
                continue
            any_curve = True
            rhos = sorted({rho for c in mine.values() for rho in c})
            add(f"### {model}: {_setting_text(setting)}\n")
            body = []
            for (_, _, series, budget), curve in sorted(mine.items(), key=lambda kv: kv[0][2:]):
                base = uniform.get((model, setting, series.split("-", 1)[1], budget))
                top = best_ratio(curve)
                body.append(
                    (
                        SERIES_TITLES[series],
                        fmt_budget(budget),
                        fmt_loss(base.loss) if base and series in FFSPLIT_SERIES else "-",
                        *(
                            "-"
                            if rho not in curve
                            else (
                                f"**{fmt_loss(curve[rho].loss)}**"
                                if rho == top
                                else fmt_loss(curve[rho].loss)
                            )
                            for rho in rhos
                        ),
                        f"{top:g}",
                    )
                )
            add(
                f"Quality loss as {_loss_title(r for r in rows if r.model == model)} by heavy ratio ρ; best in bold:\n"
            )
            add(
                _table(
                    ("method", "budget", "ρ 0 (uniform)", *(f"ρ {r:g}" for r in rhos), "best ρ"),
                    body,
                )
            )
            bands = [
                band
                for c in mine.values()
                for a in c.values()
                for b in c.values()
                if a.run_id < b.run_id and (band := noise_between(a, b)) is not None
            ]
            if bands:
                add(
                    "Probe accuracies: the best ρ is picked on point estimates; differences "
                    f"between two ratios below about ±{fmt_points(statistics.median(bands))} "
                    "(median noise band of these pairs) are probe noise.\n"
                )
            for series in (*FFSPLIT_SERIES, "random-lowrank", "random-quant"):
                rho, used = best_ratio_overall(curves, model, series, setting)
                if rho is not None:
                    add(
                        f"- best ρ for {SERIES_TITLES[series]} over {used} budget(s) "
                        f"(mean rank): **{rho:g}**"
                    )
            add("")
            suffix = "" if index == 0 else f"-s{index + 1}"
            name = f"{slug(model)}-heavy-ratio{suffix}.png"
            plain_uniform = {
                (k[2], k[3]): v for k, v in uniform.items() if k[0] == model and k[1] == setting
            }
            written.append(
                heavy_ratio_plot(
                    mine,
                    plain_uniform,
                    f"{model}: quality loss vs heavy ratio ({_setting_text(setting)})",
                    plots_dir / name,
                )
            )
            add(f"![{model} heavy ratio]({plots_link}/{name})\n")
    if not any_curve:
        add("No sweep ran two or more heavy ratios at one budget yet.\n")
    moves = transfer(curves)
    add("### Does the best heavy ratio transfer between models?\n")
    if not moves:
        add(
            "Not measurable yet: no family and budget was swept over two or more common heavy ratios on two models.\n"
        )
    else:
        for series in (*FFSPLIT_SERIES, "random-lowrank", "random-quant"):
            found = {}
            for model in models:
                for setting in _settings(rows, model):
                    rho, used = best_ratio_overall(curves, model, series, setting)
                    if rho is not None:
                        found[model] = f"{rho:g} ({used} budgets)"
                        break
            if len(found) >= 2:
                same = len({v.split()[0] for v in found.values()}) == 1
                add(
                    f"- {SERIES_TITLES[series]}, best ρ by mean rank over budgets: "
                    + ", ".join(f"{m} {v}" for m, v in found.items())
                    + (": the same on every model" if same else ": it differs between models")
                )
        add("")
        exact = sum(t.transfers for t in moves)
        noisy = sum(1 for t in moves if t.within_noise)
        add(
            f"The best ρ on one model is also the best on the other in {exact} of {len(moves)} "
            "comparisons (same family, budget and common ratios)"
            + (
                f"; in {noisy} more the extra loss on the other is within its probe noise"
                if noisy
                else ""
            )
            + "; the cost of using it there:\n"
        )
        add(
            _table(
                (
                    "method",
                    "budget",
                    "from model",
                    "to model",
                    "best ρ on from",
                    "best ρ on to",
                    "rank of from's best on to",
                    "extra loss on to (pp)",
                ),
                [
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
                ],
            )
        )

    # ---- goals
    add("## Goals\n")
    add(
        f"Per causal LM: the best variant with at least {100 * GOAL_REDUCTION:.1f}% smaller FFN "
        f"(bytes), and the best low-rank or pruned variant with at least {100 * GOAL_REDUCTION:.1f}% "
        f"fewer FFN parameters (healed or not); goal: perplexity at most +{GOAL_QUALITY_PCT:g}%.\n"
    )
    if not goal_list:
        add("No causal-LM runs yet.\n")
    else:
        add(
            _table(
                (
                    "model",
                    "goal",
                    "best variant",
                    "loss",
                    "FFN bytes cut",
                    "FFN params cut",
                    "healed",
                    "met?",
                    "best FFSplit variant",
                ),
                [
                    (
                        g.model,
                        "FFN bytes" if g.goal == "ffn_bytes" else "FFN parameters",
                        "none reaches the size"
                        if g.best is None
                        else f"{g.best.label} ({SERIES_TITLES.get(g.best.series, g.best.series)})",
                        "-" if g.best is None else fmt_loss(g.best.loss),
                        "-" if g.best is None else fmt_pct(g.best.ffn_reduction),
                        "-" if g.best is None else fmt_pct(g.best.ffn_param_reduction),
                        "-" if g.best is None else ("yes" if g.best.healed else "no"),
                        "yes" if g.met else "**no**",
                        "-"
                        if g.best_ffsplit is None
                        else f"{g.best_ffsplit.label} {fmt_loss(g.best_ffsplit.loss)}",
                    )
                    for g in goal_list
                ],
            )
        )

    # ---- healing
    add("## Healing\n")
    pairs = healing_pairs(rows)
    if not pairs:
        add("No recipe was run both with and without healing yet.\n")
    else:
        add(
            _table(
                ("model", "recipe", "without", "with", "heal steps", "heal s", "change (pp)"),
                [
                    (
                        a.model,
                        a.label + (f" [{a.setting}]" if a.setting else ""),
                        fmt_loss(a.loss),
                        fmt_loss(b.loss),
                        str(b.heal_steps),
                        _num(b.metrics.get("heal_seconds"), "{:.1f}"),
                        f"{b.loss - a.loss:+.2f}{noise_note(a, b)}",
                    )
                    for a, b in pairs
                ],
            )
        )

    # ---- all variants
    add("## All variants\n")
    for model in models:
        add(f"### {model}\n")
        add(
            _table(
                (
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
                ),
                [
                    (
                        r.label,
                        r.setting or "-",
                        SERIES_TITLES.get(r.series, r.series),
                        fmt_quality(r),
                        fmt_loss(r.loss),
                        fmt_pct(r.ffn_reduction),
                        fmt_pct(r.ffn_param_reduction),
                        fmt_pct(r.model_reduction),
                        _num(r.metrics.get("prefill_speedup"), "{:.2f}"),
                        _num(r.metrics.get("decode_speedup"), "{:.2f}"),
                        _num(r.metrics.get("profile_seconds"), "{:.1f}"),
                        _num(r.metrics.get("compress_seconds"), "{:.1f}"),
                        r.flow or "-",
                        f"`{r.run_id}`",
                        r.version or "-",
                    )
                    for r in rows
                    if r.model == model
                ],
            )
        )

    # ---- provenance
    add("## Provenance\n")
    add(f"- MLflow tracking URI: {source.uri}")
    add("- experiments: " + ", ".join(f"`{name}` (id {eid})" for name, eid in source.experiments))
    commits = sorted({r.git_commit for r in rows if r.git_commit})
    add(
        "- code versions (git commit of the variants): "
        + (", ".join(f"`{c[:12]}`" for c in commits) or "not logged")
    )
    flows_seen = sorted({r.flow for r in rows if r.flow})
    add("- flows: " + (", ".join(flows_seen) or "not tagged"))
    folders = sorted({(r.run_dir, r.command) for r in rows if r.run_dir or r.command})
    if folders:
        add("- sweep run folders and commands:")
        for folder, cmd in folders:
            add(f"  - `{folder or '?'}`: `{cmd or 'command not logged'}`")
    else:
        add(
            f"- sweep run folders and commands: not logged by the runs (tags `{RUN_DIR_TAG}`, "
            f"`{COMMAND_TAG}`)"
        )
    if source.observations:
        add("- observation runs (the latest complete one per model):")
        for obs in source.observations:
            commit = obs.params.get("git_commit", "")
            computed = obs.params.get("command", "")
            add(
                f"  - {obs.model}: run `{obs.run_id}` in `{obs.experiment}`, code "
                f"`{commit[:12] or 'not logged'}`, computed by `{computed or 'not logged'}`"
                + (
                    f", logged by `{obs.command}`"
                    if obs.command and obs.command != computed
                    else ""
                )
                + (f" (folder `{obs.run_dir}`)" if obs.run_dir else "")
            )
    else:
        add("- observation runs: none")
    add(f"- generated: {generated_at.strftime('%Y-%m-%d %H:%M:%S UTC')}")
    add("")
    return "\n".join(md), written


# --------------------------------------------------------------------------------- observation

OBSERVATION_TITLE = "Observation (the paper's premise)"
# Plot files of an observation run (tasks.observation: artifacts plots/<name>) -> page file suffix.
OBSERVATION_PLOTS = {
    "observation.png": "observation",
    "ablation.png": "ablation",
    "ablation_hidden.png": "ablation-hidden",
}
# What each ablation kind measures (tasks.observation.ablation_kind); the run's own
# ablation_<kind>_metric param names it more exactly when logged.
ABLATION_KINDS = {
    "perplexity": "perplexity (lower is better)",
    "accuracy": "linear-probe accuracy (higher is better)",
    "hidden_error": "relative error of the last hidden states vs dense (lower is better)",
}


def ablation_effect(kind: str, dense: float, value: float) -> float | None:
    """What zeroing did, on a scale where effects compare by ratio: for perplexity the increase
    of the cross-entropy in nats per token (ln(value / dense)), for accuracy the change in
    points, otherwise (hidden-state error) the difference."""
    if not (math.isfinite(dense) and math.isfinite(value)):
        return None
    if kind == "perplexity":
        return math.log(value / dense) if dense > 0 and value > 0 else None
    if kind == "accuracy":
        return 100.0 * (value - dense)
    return value - dense


def _effect_text(kind: str, effect: float | None) -> str:
    if effect is None:
        return "n/a"
    if kind == "perplexity":
        factor = math.exp(effect)
        times = f"{factor:,.0f}" if factor >= 100 else f"{factor:.3g}"
        return f"x{times} ({effect:+.3g} nats/token)"
    if kind == "accuracy":
        return f"{effect:+.1f} pp"
    return f"{effect:+.3g}"


def _value_text(kind: str, value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    if kind == "accuracy":
        return f"{value:.3f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _obs_layers(obs: ObservationRun) -> list[int]:
    return sorted({step for points in obs.series.values() for step in points})


def _jaccard_sizes(obs: ObservationRun) -> list[int]:
    names = set(obs.series) | {k[len("mean_") :] for k in obs.metrics if k.startswith("mean_")}
    return sorted(int(m.group(1)) for k in names if (m := re.fullmatch(r"jaccard_(\d+)pct", k)))


def observation_layer_table(obs: ObservationRun) -> str:
    """Per layer: top-1/5/10% shares, hit frequency and lift of the heavy set, Jaccard of the
    heavy sets of the two corpora; then the mean over layers and what a uniform spread or random
    sets give."""
    sizes = _jaccard_sizes(obs)
    head = (
        "layer",
        "top 1% share",
        "top 5% share",
        "top 10% share",
        "hit frequency",
        "hit lift",
        *(f"Jaccard {p}%" for p in sizes),
    )

    def row(label: str, get: Any) -> tuple[str, ...]:
        lift = get("hit_lift")
        return (
            label,
            _share(get("top1_share")),
            _share(get("top5_share")),
            _share(get("top10_share")),
            _share(get("hit_frequency")),
            "-" if lift is None else f"{lift:.1f}x",
            *("-" if (j := get(f"jaccard_{p}pct")) is None else f"{j:.2f}" for p in sizes),
        )

    body = [
        row(str(layer), lambda key, layer=layer: _finite(obs.series.get(key, {}).get(layer)))
        for layer in _obs_layers(obs)
    ]
    body.append(row("**mean**", lambda key: _finite(obs.metrics.get(f"mean_{key}"))))
    reference = {
        "top1_share": 0.01,
        "top5_share": 0.05,
        "top10_share": 0.10,
        "hit_frequency": _finite(obs.metrics.get("mean_uniform_hit_frequency")),
        "hit_lift": 1.0,
        **{
            f"jaccard_{p}pct": _finite(obs.metrics.get(f"mean_random_jaccard_{p}pct"))
            for p in sizes
        },
    }
    body.append(row("uniform / random", lambda key: reference.get(key)))
    return _table(head, body)


def observation_ablation_table(obs: ObservationRun) -> str:
    """Dense against the top 1% by score, a random 1% (mean over seeds) and the bottom 1% zeroed
    in every layer, per measured quantity, with the effect of the top and the random set."""
    pct = _finite(_float_or_none(obs.params.get("ablation_fraction")))
    size = f"{100 * pct:g}%" if pct is not None else "1%"
    seeds = [s for s in obs.params.get("ablation_seeds", "").split(",") if s]
    body = []
    for kind, default_title in ABLATION_KINDS.items():
        logged = obs.params.get(f"ablation_{kind}_metric")
        better = "higher" if kind == "accuracy" else "lower"
        title = f"{logged} ({better} is better)" if logged else default_title
        values = {
            suffix: _finite(obs.metrics.get(f"ablation_{kind}_{suffix}"))
            for suffix in ("dense", "top", "random", "random_std", "bottom", "chance")
        }
        get = values.get
        dense, top, rand = get("dense"), get("top"), get("random")
        if dense is None or (top is None and rand is None):
            continue
        std = get("random_std")
        top_effect = None if top is None else ablation_effect(kind, dense, top)
        rand_effect = None if rand is None else ablation_effect(kind, dense, rand)
        verdict = f"top {_effect_text(kind, top_effect)}, random {_effect_text(kind, rand_effect)}"
        if top_effect is not None and rand_effect and top_effect / rand_effect > 0:
            ratio = top_effect / rand_effect
            times = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"
            verdict += f": {times}x the random set's effect"
        elif top_effect and rand_effect == 0:
            verdict += " (the random set changes nothing)"
        tested = _count(_float_or_none(obs.params.get("probe_per_split")))
        if kind == "accuracy" and tested and top is not None:
            # the probe's binomial noise (module docstring): dense vs top-zeroed accuracy
            se = [math.sqrt(max(q * (1 - q), 0.0) / tested) for q in (dense, top)]
            band = 100 * Z95 * math.hypot(*se)
            if top_effect is not None and abs(top_effect) < band:
                verdict += f"; within the probe's noise (±{band:.1f} pp at n={tested})"
        chance = get("chance")
        body.append(
            (
                title + (f"; chance {chance:.3f}" if chance is not None else ""),
                _value_text(kind, dense),
                _value_text(kind, get("bottom")),
                _value_text(kind, rand)
                + (f" ± {_value_text(kind, std)}" if std is not None else "")
                + (f" ({len(seeds)} seeds)" if seeds else ""),
                _value_text(kind, top),
                verdict,
            )
        )
    if not body:
        return "No ablation metrics were logged by this run.\n"
    head = (
        "measured",
        "dense",
        f"zero bottom {size}",
        f"zero random {size}",
        f"zero top {size}",
        "effect vs dense",
    )
    return _table(head, body)


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def observation_section(
    observations: Sequence[ObservationRun],
    variant_models: Sequence[str],
    plots_dir: Path,
    plots_link: str,
) -> tuple[str, list[Path]]:
    """The page's observation section and the plot files it wrote into plots_dir."""
    from ffsplit.files import atomic_path

    md = [f"## {OBSERVATION_TITLE}\n"]
    how = (
        "`python -m flows.observation run --models MODEL` (computes it on Ray and logs it), or "
        "log a record folder that bench/observation.py wrote with `python -m flows.observation "
        "log --record bench/results/observation/MODEL`"
    )
    if not observations:
        md.append(f"No observation run in the experiments read yet. Make one with {how}.\n")
        return "\n".join(md), []
    md.append(
        "From each model's latest complete observation run (tag `ffsplit.role=observation`). "
        "Share: the part of the sum of squared neuron output norms s_j^2 (s_j = sqrt(S2_j)·||v_j||, "
        "over the calibration tokens) held by the top 1/5/10% of a layer's neurons by score; a "
        "uniform spread gives 1/5/10%. Hit frequency: how often one neuron of the heavy set "
        "(top 1% by score) is among the k largest output norms of a token (k = 1% of the layer's "
        "neurons); uniform: k/m, and the lift is the ratio. Jaccard: overlap of the heavy sets "
        "chosen from Wikipedia and from news calibration text, against the expectation for two "
        "random sets. Ablation: the top 1% of neurons by score zeroed in every FFN layer, against a "
        "random 1% (mean ± sd over seeds) and the bottom 1%; effects are compared as cross-entropy "
        "increase for perplexity (ln of its factor), accuracy points for the probe and the "
        "difference for the hidden-state error.\n"
    )
    written: list[Path] = []
    for obs in observations:
        p = obs.params
        tokens = p.get("calibration_tokens") or _num(
            obs.metrics.get("calibration_tokens"), "{:.0f}"
        )
        md.append(f"### {obs.model}\n")
        md.append(
            f"Run `{obs.run_id}`: {tokens} calibration tokens each of {p.get('corpus_a', '?')} and "
            f"{p.get('corpus_b', '?')}, {_num(obs.metrics.get('layers'), '{:.0f}')} FFN layers; "
            f"heavy set: top {100 * (_float_or_none(p.get('heavy_ratio')) or 0.01):g}% by "
            f"{p.get('corpus_a', '?')} score.\n"
        )
        md.append(observation_layer_table(obs))
        md.append("Ablation:\n")
        md.append(observation_ablation_table(obs))
        for name, suffix in OBSERVATION_PLOTS.items():
            data = obs.plots.get(name)
            if data is None:
                continue
            file = f"{slug(obs.model)}-{suffix}.png"
            with atomic_path(plots_dir / file) as tmp:
                tmp.write_bytes(data)
            written.append(plots_dir / file)
            md.append(f"![{obs.model} {suffix}]({plots_link}/{file})\n")
    missing = sorted(set(variant_models) - {o.model for o in observations})
    if missing:
        md.append(f"No observation run for {', '.join(missing)} yet: make one with {how}.\n")
    return "\n".join(md), written


def _num(value: Any, fmt: str) -> str:
    v = _finite(value)
    return "-" if v is None else fmt.format(v)


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
        if stale not in plots and re.search(
            r"-((tradeoff|heavy-ratio)(-s\d+)?|observation|ablation|ablation-hidden)\.png$",
            stale.name,
        ):
            stale.unlink()
    write_text_atomic(out, text)
    return out, plots
