"""An observation record folder (tasks/observation.py) logged in MLflow as one run.

`log_observation(record_dir)` logs one record folder as one MLflow run in the experiment of its
base model ('ffsplit/<model>', the experiment of that model's variants, tracking.registry), tagged
ffsplit.role=observation; no model version is registered (an observation is not a servable
variant). Like tracking.registry's variant registration it is all or nothing: params, metrics and
artifacts are written and read back, the run is marked FINISHED, and the tag
ffsplit.complete=true is the very last write; any failure removes the run's artifacts and marks it
FAILED, so a run that looks complete always holds everything. The same record logged again
(content tag = sha256 of the record) returns the existing complete run.

Metrics: per-layer series with the MLflow step = layer index (top1_share, top5_share, top10_share,
hit_frequency = mean over heavy neurons of the share of tokens on which that neuron is among the
layer's top-k output norms, hit_lift = hit_frequency / (k / m), heavy_slot_share, jaccard_1pct /
_5pct / _10pct = Jaccard of the heavy sets of the two corpora, coverage_rate); scalar headlines
mean_<series> (means over layers) and the ablation: ablation_<kind>_{dense, top, random,
random_std, bottom, chance}, kind perplexity or accuracy (and hidden_error for encoders).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.observation import (
    RECORD,
    ablation_kind,
    plot_names,
    read_record,
    record_content,
    stability_pct,
)
from tasks.runtime import prefect_task

PLOTS_ARTIFACT_DIR = "plots"
OBSERVATION_ROLE = "observation"
FLOW_TAG = "ffsplit.flow"
RECORD_DIR_TAG = "ffsplit.record_dir"
METRICS_SKIPPED_TAG = "ffsplit.metrics_skipped"
# Per-layer series logged as metric steps: (metric name, record block, key in its layer rows).
SERIES = (
    ("top1_share", "observation", "top1_share"),
    ("top5_share", "observation", "top5_share"),
    ("top10_share", "observation", "top10_share"),
    ("hit_frequency", "observation", "heavy_hit_rate"),
    ("hit_lift", "observation", "hit_lift"),
    ("heavy_slot_share", "observation", "heavy_slot_share"),
    ("coverage_rate", "coverage", "covered_rate"),
)


def _pct_key(record: Mapping[str, Any], name: str) -> str:
    return f"{stability_pct(name, record['stability'][name])}pct"


def observation_metrics(
    record: Mapping[str, Any],
) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """(scalar metrics, per-layer series {name: [(layer, value)]}) of a checked record.

    Non-finite scalars (a perplexity that overflowed) are left out; the record artifact keeps them.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for name, block, key in SERIES:
        series[name] = [(int(r["layer"]), float(r[key])) for r in record[block]["layers"]]
    for name, block in record["stability"].items():
        pct = _pct_key(record, name)
        series[f"jaccard_{pct}"] = [(int(r["layer"]), float(r["jaccard"])) for r in block["layers"]]
    scalars: dict[str, float] = {
        "layers": float(len(record["observation"]["layers"])),
        "calibration_tokens": float(record["observation"]["tokens"]),
    }
    mean = record["observation"]["mean"]
    for name, block, key in SERIES:
        source = mean if block == "observation" else record[block]["mean"]
        if key in source:
            scalars[f"mean_{name}"] = float(source[key])
    scalars["mean_uniform_hit_frequency"] = float(mean["uniform_hit_rate"])
    scalars["mean_uniform_slot_share"] = float(mean["uniform_slot_share"])
    scalars["mean_score_gini"] = float(mean["score_gini"])
    if "random_covered_rate" in record["coverage"]["mean"]:
        scalars["mean_random_coverage_rate"] = float(
            record["coverage"]["mean"]["random_covered_rate"]
        )
    for name, block in record["stability"].items():
        pct = _pct_key(record, name)
        scalars[f"mean_jaccard_{pct}"] = float(block["mean"]["jaccard"])
        scalars[f"mean_random_jaccard_{pct}"] = float(block["mean"]["random_jaccard"])
    for block_name in ("ablation", "ablation_hidden"):
        block = record.get(block_name)
        if not block:
            continue
        kind = ablation_kind(block_name, block)
        values = {
            "dense": block["dense"],
            "top": block["top"],
            "random": block["random_mean"],
            "random_std": block.get("random_std"),
            "bottom": block.get("bottom"),
            "chance": block.get("chance"),
        }
        for suffix, value in values.items():
            if value is not None:
                scalars[f"ablation_{kind}_{suffix}"] = float(value)
    total = (record.get("seconds") or {}).get("total")
    if isinstance(total, int | float):
        scalars["observation_seconds"] = float(total)
    return {k: v for k, v in scalars.items() if math.isfinite(v)}, series


def _non_finite(record: Mapping[str, Any]) -> list[str]:
    """Ablation metrics left out because their value is not finite (e.g. perplexity inf)."""
    out = []
    for block_name in ("ablation", "ablation_hidden"):
        block = record.get(block_name)
        for suffix, key in (("dense", "dense"), ("top", "top"), ("random", "random_mean")):
            if block and not math.isfinite(float(block[key])):
                out.append(f"ablation_{ablation_kind(block_name, block)}_{suffix}")
    return out


def observation_params(record: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params: model, corpora, token counts, heavy ratio, ablation, command, code version."""
    from tracking.registry import MAX_PARAM_LENGTH, redact

    model = record["model"]
    data = record.get("data") or {}
    machine = record.get("machine") or {}
    profile = record.get("profile") or {}
    out: dict[str, Any] = {
        "model": model.get("name"),
        "model_sha256": model.get("weights_sha256"),
        "model_architecture": model.get("architecture"),
        "model_source": model.get("source"),
        "adapter": record.get("adapter"),
        "corpus_a": record["corpora"]["a"],
        "corpus_b": record["corpora"]["b"],
        "heavy_ratio": record["heavy_ratio"],
        "stability_ratios": ",".join(
            f"{stability_pct(k, v) / 100:g}" for k, v in record["stability"].items()
        ),
        "hit_top_fraction": profile.get("hit_top_fraction"),
        "profile_batch_size": profile.get("batch_size"),
        "command": redact(str(record.get("command", ""))),
        "git_commit": machine.get("commit"),
        "worktree_dirty": machine.get("worktree_dirty"),
        "host": machine.get("host"),
        "device": machine.get("device"),
        "threads": machine.get("threads"),
        "torch": machine.get("torch"),
        "transformers": machine.get("transformers"),
        "date": machine.get("date"),
    }
    for name in ("calibration", "other_corpus", "evaluation"):
        ref = data.get(name) or {}
        for key in ("corpus", "split", "tokens", "window", "sha256"):
            if key in ref:
                out[f"{name}_{key}"] = ref[key]
    probe = data.get("probe") or {}
    for key in ("corpus", "per_split"):
        if key in probe:
            out[f"probe_{key}"] = probe[key]
    for block_name in ("ablation", "ablation_hidden"):
        block = record.get(block_name)
        if block:
            kind = ablation_kind(block_name, block)
            out[f"ablation_{kind}_metric"] = block.get("metric")
            out[f"ablation_{kind}_higher_is_better"] = block.get("higher_is_better")
            out["ablation_fraction"] = block.get("fraction")
            out["ablation_seeds"] = ",".join(str(s) for s in block.get("seeds", []))
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in out.items() if v is not None and str(v) != ""}


@dataclass(frozen=True)
class LoggedObservation:
    """A complete observation run in MLflow."""

    model: str
    run_id: str
    experiment_id: str
    reused: bool = False  # True when the same record was already logged

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "reused": self.reused,
        }


def _find_complete(client: Any, experiment_id: str, content: str) -> Any | None:
    from tracking.registry import COMPLETE_TAG, CONTENT_TAG, ROLE_TAG

    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{ROLE_TAG}` = '{OBSERVATION_ROLE}' and tags.`{CONTENT_TAG}` = '{content}'"
        ),
        max_results=100,
    )
    for run in runs:
        if run.info.status == "FINISHED" and run.data.tags.get(COMPLETE_TAG) == "true":
            return run
    return None


def _verify(
    client: Any,
    run_id: str,
    scalars: Mapping[str, float],
    series: Mapping[str, list[tuple[int, float]]],
    params: Mapping[str, str],
    artifacts: list[str],
) -> None:
    """Read back what the run must hold before it may be called complete."""
    from tracking.registry import RegistryError, _artifact_exists

    data = client.get_run(run_id).data
    wrong = [
        k
        for k, v in scalars.items()
        if not math.isclose(data.metrics.get(k, math.nan), v, rel_tol=1e-12, abs_tol=0.0)
    ]
    for name, points in series.items():
        logged = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        if any(not math.isclose(logged.get(s, math.nan), v, rel_tol=1e-12) for s, v in points):
            wrong.append(name)
    if wrong:
        raise RegistryError(f"run {run_id}: metrics {wrong} did not read back")
    lost = [k for k in params if data.params.get(k) != params[k]]
    if lost:
        raise RegistryError(f"run {run_id}: params {lost} did not read back")
    missing = [n for n in artifacts if not _artifact_exists(client, run_id, n)]
    if missing:
        raise RegistryError(f"run {run_id}: artifacts {missing} are missing after upload")


def _log_once(
    client: Any,
    uri: str,
    folder: Path,
    record: Mapping[str, Any],
    plots: Mapping[str, Path],
    tags: Mapping[str, str],
    progress: Callable[[str], None],
) -> LoggedObservation:
    from tracking.registry import (
        COMPLETE_TAG,
        CONTENT_TAG,
        ROLE_TAG,
        _abort,
        _experiment_id,
        _log_artifact,
        log_metrics,
        log_params,
    )

    model = str(record["model"]["name"])
    experiment_id = _experiment_id(client, uri, model)
    content = record_content(record)
    found = _find_complete(client, experiment_id, content)
    if found is not None:
        return LoggedObservation(model, found.info.run_id, experiment_id, reused=True)
    scalars, series = observation_metrics(record)
    params = observation_params(record)
    run_tags = {
        **tags,
        ROLE_TAG: OBSERVATION_ROLE,
        CONTENT_TAG: content,
        "ffsplit.base_model": model,
        RECORD_DIR_TAG: str(folder.resolve()),
    }
    skipped = _non_finite(record)
    if skipped:
        run_tags[METRICS_SKIPPED_TAG] = ",".join(skipped)
    progress("run")
    run = client.create_run(experiment_id, run_name=f"observation-{model}", tags=run_tags)
    run_id = run.info.run_id
    try:
        progress("params")
        log_params(client, run_id, params)
        progress("metrics")
        log_metrics(client, run_id, scalars, series)
        progress("artifacts")
        names = [RECORD]
        _log_artifact(client, run_id, RECORD, folder / RECORD)
        for name, path in plots.items():
            artifact = f"{PLOTS_ARTIFACT_DIR}/{name}"
            _log_artifact(client, run_id, artifact, path)
            names.append(artifact)
        progress("verify")
        _verify(client, run_id, scalars, series, params, names)
        progress("complete")
        client.set_terminated(run_id, "FINISHED")
        client.set_tag(run_id, COMPLETE_TAG, "true")  # the last write
    except BaseException as exc:
        _abort(client, uri, run, model, None, exc)
        raise
    return LoggedObservation(model, run_id, experiment_id)


def log_observation(
    record_dir: str | Path,
    uri: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> LoggedObservation:
    """Log a record folder (observation.json and its plots) as one complete MLflow run.

    The record is checked and the store probed before anything is written; plots missing from
    the folder are drawn from the record (into a temporary folder, the record folder is left as
    it is). uri: MLFLOW_TRACKING_URI, else the local stack's server (tracking.registry.tracking_uri).
    """
    from reports.observation_plots import observation_plots
    from tracking.registry import _check_tags, _connect, _retrying

    folder = Path(record_dir)
    record = read_record(folder)
    checked_tags = _check_tags(tags or {})
    uri, client = _connect(uri, timeout)
    report = progress or (lambda stage: None)
    with tempfile.TemporaryDirectory(prefix="ffsplit-observation-") as tmp:
        plots: dict[str, Path] = {}
        if not all((folder / n).is_file() for n in plot_names(record)):
            observation_plots(record, tmp)
        for name in plot_names(record):
            plots[name] = folder / name if (folder / name).is_file() else Path(tmp) / name
        return _retrying(
            f"logging the observation {folder}",
            uri,
            lambda: _log_once(client, uri, folder, record, plots, checked_tags, report),
            retries,
            backoff,
        )


@prefect_task(name="log-observation")
def log_observation_task(record_dir: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Prefect task: log_observation of one record folder (MLFLOW_TRACKING_URI)."""
    return log_observation(record_dir, tags=tags).to_dict()
