"""The only part of the page that talks to MLflow: runs become `Row`s, observation runs become
`ObservationRun`s.

A run's recipe is rebuilt from its params (tracking.registry logs the manifest's recipe flattened
as `recipe.*` params, ffsplit.variant.manifest.flat_params) with `Recipe.from_dict`, which migrates
version-1 recipes; its series, label, heavy ratio and options then come from the Recipe, so "which
baseline is this" is worked out in one place (ffsplit/config.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ffsplit.config import (
    RECIPE_VERSION,
    Config,
    HealConfig,
    ProfileConfig,
    Recipe,
    method_defaults,
)
from ffsplit.errors import FFSplitError
from ffsplit.variant.manifest import flat_params
from reports.results.rows import (
    BASELINE_SERIES,
    COMMAND_TAG,
    FFSPLIT_SERIES,
    RECORD_ARTIFACT,
    RUN_DIR_TAG,
    TEST_EXAMPLES_METRIC,
    ObservationRun,
    Row,
    Source,
    count,
    record_test_examples,
)
from reports.results.tables import with_reference
from tracking.registry import COMPLETE_TAG, EXPERIMENT_PREFIX, ROLE_TAG, redact

RECIPE_PREFIX = "recipe."
VERSION_PARAM = "recipe.version"  # absent: version 1, which did not log it

# ------------------------------------------------------------------------------- rows from runs


def param_value(text: str) -> Any:
    """A param back as the value flat_params logged: str() of a scalar, JSON of a list."""
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    if text.startswith("["):
        return json.loads(text)
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def recipe_from_params(params: Mapping[str, str]) -> Recipe | None:
    """The recipe a run logged as `recipe.*` params, unflattened and rebuilt (version-1 recipes
    migrated); None when the run logged no recipe. Raises FFSplitError when the params do not
    make a recipe this ffsplit reads."""
    tree: dict[str, Any] = {}
    for key, text in params.items():
        if not key.startswith(RECIPE_PREFIX):
            continue
        *path, leaf = key[len(RECIPE_PREFIX) :].split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = param_value(text)
    if not tree:
        return None
    tree.setdefault("version", 1)  # every recipe since version 2 logs its version
    return Recipe.from_dict(tree)


def setting_of(recipe: Recipe, made_with: int = RECIPE_VERSION) -> str:
    """The recipe's options other than its place on the grid (method, selection, heavy ratio,
    budget, seed, the method's placement fields), as 'key=value, ...' where they differ from the
    defaults of the ffsplit that made it (recipe version ``made_with``; "" = defaults): its
    method's options, profiling, and healing when it heals (healing off reads the same whatever
    else its config holds)."""
    method = recipe.method_name
    parts: dict[str, Config] = {method: recipe.method, "profile": recipe.profile}
    defaults: dict[str, Config] = {
        method: method_defaults(method, made_with),
        "profile": ProfileConfig(),
    }
    if recipe.heal.enabled:
        parts["heal"], defaults["heal"] = recipe.heal, HealConfig()

    def options(configs: Mapping[str, Config]) -> dict[str, Any]:
        tree = {
            name: {k: v for k, v in c.to_dict().items() if k not in recipe.method.placement}
            for name, c in configs.items()
        }
        return flat_params({"recipe": tree})

    mine, default = options(parts), options(defaults)
    return ", ".join(
        f"{key[len(RECIPE_PREFIX) :]}={value}"
        for key, value in sorted(mine.items())
        if not key.endswith(".version") and default.get(key) != value
    )


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
    """A Row from one run's params (the flattened manifest), metrics and tags. A run without
    recipe params is placed by its tags (ffsplit.series, or the dense role)."""
    try:
        recipe = recipe_from_params(params)
    except FFSplitError as exc:
        raise FFSplitError(
            f"run {run_id} ({run_name or 'unnamed'}) of {model}: its recipe params do not make a "
            f"recipe: {exc}"
        ) from None
    dense = tags.get(ROLE_TAG) == "dense"
    place: dict[str, Any]  # where the recipe puts the run on the page
    if recipe is not None:
        series = "dense" if dense else recipe.series
        place = {
            "method": recipe.method_name,
            "heavy_ratio": recipe.heavy,
            "budget": recipe.ffn_reduction,
            "setting": setting_of(recipe, int(param_value(params.get(VERSION_PARAM, "1")))),
            "heal_steps": recipe.heal.steps,
            "selection": recipe.selection,
            "gptq": getattr(recipe.method, "gptq", None),
        }
    else:
        series = "dense" if dense else tags.get("ffsplit.series", "")
        place = {"method": "none" if series == "dense" else "", "heavy_ratio": 0.0, "budget": 0.0}
    return Row(
        model=model,
        run_id=run_id,
        label=run_name or (recipe.label if recipe is not None else run_id),
        series=series,
        **place,
        metrics={k: float(v) for k, v in metrics.items()},
        start_time=int(start_time or 0),
        experiment=experiment,
        version=version,
        flow=tags.get("ffsplit.flow", ""),
        variant_key=tags.get("ffsplit.variant_key") or tags.get("ffsplit.content_sha256", ""),
        git_commit=params.get("git_commit", ""),
        run_dir=tags.get(RUN_DIR_TAG, ""),
        command=tags.get(COMMAND_TAG, ""),
        test_examples=count(metrics.get(TEST_EXAMPLES_METRIC)),
    )


def dedupe(rows: Iterable[Row]) -> tuple[list[Row], int]:
    """(rows with one per model and variant key, the latest run; how many were dropped)."""
    latest: dict[tuple[str, str], Row] = {}
    seen = 0
    for row in rows:
        seen += 1
        key = (row.model, row.variant_key or row.run_id)
        old = latest.get(key)
        if old is None or (row.start_time, row.run_id) > (old.start_time, old.run_id):
            latest[key] = row
    kept = sorted(latest.values(), key=_order)
    return kept, seen - len(kept)


def _order(row: Row) -> tuple:
    families = ("dense", *FFSPLIT_SERIES, *BASELINE_SERIES, "prune-random")
    rank = families.index(row.series) if row.series in families else len(families)
    return (row.model, row.setting, row.budget, rank, row.heavy_ratio, row.label, row.run_id)


# ---------------------------------------------------------------------------- reading MLflow


def read_rows(uri: str, models: Sequence[str] | None = None) -> tuple[list[Row], Source]:
    """Complete, FINISHED runs of the ffsplit experiments (all, or those of `models`) as rows,
    deduplicated by variant key, with their dense reference (tables.with_reference). Observation
    runs (tag ffsplit.role=observation) are not variants: the latest complete one of each model
    goes to Source.observations instead. Raises FFSplitError (one line) for unknown models or no
    runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    chosen = _chosen_experiments(client, uri, models)
    try:
        found = _Found(_complete_versions(client))
        for exp in chosen:
            found.read(client, exp)
    except FFSplitError:
        raise
    except Exception as exc:
        raise _fail("reading runs", uri, exc) from None
    kept, dropped = dedupe(found.rows)
    if not kept and not found.observed:
        raise FFSplitError(
            f"no complete ffsplit runs in {', '.join(e.name for e in chosen)} at {redact(uri)} "
            f"({found.read_count} runs, {found.incomplete} incomplete): run a sweep first "
            "(python -m flows.sweep run)"
        )
    try:
        kept = _with_record_test_examples(client, kept)
    except Exception as exc:
        raise _fail(f"reading {RECORD_ARTIFACT} artifacts", uri, exc) from None
    try:
        observations = tuple(
            _observation_run(client, model, *found.observed[model])
            for model in sorted(found.observed)
        )
    except Exception as exc:
        raise _fail("reading observation runs", uri, exc) from None
    experiments = tuple((e.name, str(e.experiment_id)) for e in chosen)
    source = Source(
        redact(uri), experiments, found.read_count, found.incomplete, dropped, observations
    )
    return with_reference(kept), source


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


def _chosen_experiments(client: Any, uri: str, models: Sequence[str] | None) -> list[Any]:
    """The experiments 'ffsplit/<model>' to read: those of `models`, else all, by model name."""
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
    return chosen


def _complete_versions(client: Any) -> dict[str, str]:
    """run id -> "name vN" of the first complete registered model version of that run."""
    versions: dict[str, str] = {}
    for mv in _paged(
        lambda token: client.search_model_versions(max_results=1000, page_token=token)
    ):
        if (mv.tags or {}).get(COMPLETE_TAG) == "true":
            versions.setdefault(mv.run_id, f"{mv.name} v{mv.version}")
    return versions


@dataclasses.dataclass
class _Found:
    """What reading the experiments found: variant rows, the latest observation run of each
    model (run, experiment name), and how many runs were read and skipped as incomplete."""

    versions: dict[str, str]
    rows: list[Row] = dataclasses.field(default_factory=list)
    observed: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    read_count: int = 0
    incomplete: int = 0

    def read(self, client: Any, exp: Any) -> None:
        """Every active run of one experiment."""
        from mlflow.entities import ViewType

        from tracking.observation import OBSERVATION_ROLE

        runs = _paged(
            lambda token: client.search_runs(
                [exp.experiment_id],
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=token,
            )
        )
        for run in runs:
            self.read_count += 1
            tags = run.data.tags
            if run.info.status != "FINISHED" or tags.get(COMPLETE_TAG) != "true":
                self.incomplete += 1
                continue
            model = tags.get("ffsplit.base_model") or exp.name[len(EXPERIMENT_PREFIX) :]
            if tags.get(ROLE_TAG) == OBSERVATION_ROLE:  # not a variant: its own section
                old = self.observed.get(model)
                if old is None or _run_order(run) > _run_order(old[0]):
                    self.observed[model] = (run, exp.name)
                continue
            self.rows.append(
                row_from_run(
                    model=model,
                    run_id=run.info.run_id,
                    run_name=run.info.run_name or "",
                    params=run.data.params,
                    metrics=run.data.metrics,
                    tags=tags,
                    start_time=run.info.start_time or 0,
                    experiment=exp.name,
                    version=self.versions.get(run.info.run_id, ""),
                )
            )


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
    folder = RECORD_ARTIFACT.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory(prefix="ffsplit-results-") as tmp:
        for index, row in enumerate(rows):
            if row.quality_kind != "accuracy" or row.quality is None or row.test_examples:
                out.append(row)
                continue
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
