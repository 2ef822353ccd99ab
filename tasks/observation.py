"""Observation stage (issue 6): the paper's premise measured on a base model, and logged in MLflow.

`observe` runs ffsplit.jobs.observation_job as one Ray task (a whole node's CPUs, or a GPU when the
cluster has one) and writes a record folder atomically: observation.json (the job's record), its
plots (tasks.observation_plots) and settings.json (model, weights sha256, parameters). A complete
folder made with the same settings is returned as it is, so a resumed flow does not recompute it.

`log_observation(record_dir)` logs one record folder as one MLflow run in the experiment of its
base model ('ffsplit/<model>', the experiment of that model's variants, tasks.registry), tagged
ffsplit.role=observation; no model version is registered (an observation is not a servable
variant). Like tasks.registry's variant registration it is all or nothing: params, metrics and
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

import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from tasks.runtime import (
    check_model_sha,
    node_cpus,
    prefect_task,
    release_worker_caches,
    run_remote,
    set_task_threads,
    task_device,
    task_resources,
)

RECORD = "observation.json"
SETTINGS = "settings.json"  # in a flow's record folder: the model and parameters that made it
PLOTS = ("observation.png", "ablation.png")
HIDDEN_PLOT = "ablation_hidden.png"  # encoders only: the relative error of the hidden states
PLOTS_ARTIFACT_DIR = "plots"
OBSERVATION_ROLE = "observation"
FLOW_TAG = "ffsplit.flow"
RECORD_DIR_TAG = "ffsplit.record_dir"
METRICS_SKIPPED_TAG = "ffsplit.metrics_skipped"
HOW_TO_MAKE = "python -m flows.observation run --models MODEL (or bench/observation.py)"

# What a record must hold to be logged and shown (dotted paths; lists checked row by row).
REQUIRED = (
    "command",
    "model.name",
    "adapter",
    "data.calibration",
    "data.other_corpus",
    "corpora.a",
    "corpora.b",
    "heavy_ratio",
    "observation.tokens",
    "observation.layers",
    "observation.mean",
    "stability",
    "coverage.layers",
    "coverage.mean",
    "ablation",
)
LAYER_KEYS = (
    "layer",
    "top1_share",
    "top5_share",
    "top10_share",
    "heavy_hit_rate",
    "uniform_hit_rate",
    "hit_lift",
    "heavy_slot_share",
    "uniform_slot_share",
)
MEAN_KEYS = LAYER_KEYS[1:] + ("score_gini",)
STABILITY_LAYER_KEYS = ("layer", "jaccard", "random_jaccard")
COVERAGE_LAYER_KEYS = ("layer", "covered_rate", "random_covered_rate")
ABLATION_KEYS = (
    "metric",
    "higher_is_better",
    "fraction",
    "dense",
    "top",
    "random",
    "random_mean",
)
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


# ------------------------------------------------------------------------------------ the record


def _missing(where: str, path: str) -> FFSplitError:
    return FFSplitError(f"{where}: key '{path}' is missing; write the record with {HOW_TO_MAKE}")


def _get(record: Any, path: str, where: str) -> Any:
    node = record
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        if not isinstance(node, Mapping) or part not in node:
            raise _missing(where, ".".join(walked))
        node = node[part]
    return node


def _number(value: Any, where: str, path: str, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FFSplitError(f"{where}: key '{path}' is {value!r}, not a number")
    if finite and not math.isfinite(value):
        raise FFSplitError(f"{where}: key '{path}' is {value!r}, not a finite number")
    return float(value)


def _rows(record: Any, path: str, keys: tuple[str, ...], where: str) -> list[Mapping[str, Any]]:
    rows = _get(record, path, where)
    if not isinstance(rows, list) or not rows:
        raise FFSplitError(f"{where}: key '{path}' must be a non-empty list of per-layer rows")
    for i, row in enumerate(rows):
        for key in keys:
            if not isinstance(row, Mapping) or key not in row:
                raise _missing(where, f"{path}[{i}].{key}")
            _number(row[key], where, f"{path}[{i}].{key}")
    return rows


def stability_pct(block_key: str, block: Mapping[str, Any]) -> int:
    """The heavy-set size of a stability block in whole percent ('5%' or ratio 0.05 -> 5)."""
    ratio = block.get("ratio") if isinstance(block, Mapping) else None
    if isinstance(ratio, int | float) and not isinstance(ratio, bool):
        return round(100 * float(ratio))
    return round(float(block_key.rstrip("%")))


def ablation_kind(block_name: str, block: Mapping[str, Any]) -> str:
    """perplexity, accuracy or hidden_error: what an ablation block of a record measured."""
    if block_name == "ablation_hidden":
        return "hidden_error"
    metric = str(block.get("metric", "")).lower()
    if "perplexity" in metric:
        return "perplexity"
    if "accuracy" in metric:
        return "accuracy"
    return "accuracy" if block.get("higher_is_better") else "perplexity"


def check_record(record: Any, where: str) -> dict[str, Any]:
    """The record, if it holds every key the log and the results page read; else a one-line
    FFSplitError naming the file (`where`) and the first missing key."""
    if not isinstance(record, Mapping):
        raise FFSplitError(f"{where}: not a JSON object; write the record with {HOW_TO_MAKE}")
    for path in REQUIRED:
        _get(record, path, where)
    if not str(_get(record, "model.name", where)).strip():
        raise FFSplitError(f"{where}: key 'model.name' is empty; it names the MLflow experiment")
    _number(record["heavy_ratio"], where, "heavy_ratio")
    _rows(record, "observation.layers", LAYER_KEYS, where)
    for key in MEAN_KEYS:
        _number(_get(record, f"observation.mean.{key}", where), where, f"observation.mean.{key}")
    stability = record["stability"]
    if not isinstance(stability, Mapping) or not stability:
        raise FFSplitError(f"{where}: key 'stability' must map heavy-set sizes ('1%') to blocks")
    for name in stability:
        _rows(record, f"stability.{name}.layers", STABILITY_LAYER_KEYS, where)
        for key in ("jaccard", "random_jaccard"):
            path = f"stability.{name}.mean.{key}"
            _number(_get(record, path, where), where, path)
    _rows(record, "coverage.layers", COVERAGE_LAYER_KEYS, where)
    for block in ("ablation", "ablation_hidden"):
        if block == "ablation_hidden" and block not in record:
            continue
        for key in ABLATION_KEYS:
            _get(record, f"{block}.{key}", where)
        # the damage of zeroing can be unbounded (perplexity inf): finite is not required
        for key in ("dense", "top", "random_mean"):
            _number(record[block][key], where, f"{block}.{key}", finite=False)
    return dict(record)


def read_record(record_dir: str | Path) -> dict[str, Any]:
    """observation.json of a record folder, checked (check_record)."""
    folder = Path(record_dir)
    path = folder / RECORD
    if not folder.is_dir():
        raise FFSplitError(f"record folder {folder} does not exist; write it with {HOW_TO_MAKE}")
    if not path.is_file():
        raise FFSplitError(f"{path} does not exist; write the record with {HOW_TO_MAKE}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FFSplitError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    return check_record(record, str(path))


def plot_names(record: Mapping[str, Any]) -> list[str]:
    """The PNG files a record's folder holds (tasks.observation_plots.observation_plots)."""
    return [*PLOTS, *([HIDDEN_PLOT] if "ablation_hidden" in record else [])]


def record_content(record: Mapping[str, Any]) -> str:
    """sha256 of the record's content (key order and formatting do not matter)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ the Ray task


def _complete(folder: Path, settings: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The record of a complete record folder (valid record, every plot, and when `settings` is
    given the same SETTINGS file: model, its weights and the job's parameters), else None."""
    try:
        record = read_record(folder)
    except FFSplitError:
        return None
    if not all((folder / name).is_file() for name in plot_names(record)):
        return None
    if settings is not None:
        try:
            if json.loads((folder / SETTINGS).read_text()) != json.loads(json.dumps(settings)):
                return None
        except (OSError, ValueError):
            return None
    return record


def write_record_dir(
    record: Mapping[str, Any], out: str | Path, settings: Mapping[str, Any] | None = None
) -> Path:
    """observation.json, the plots (and SETTINGS, what made them) into `out`, as one atomic
    folder (replacing an old one)."""
    from ffsplit.files import atomic_dir
    from tasks.observation_plots import observation_plots

    target = Path(out)
    check_record(record, f"record for {target}")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        observation_plots(record, tmp)
        if settings is not None:
            (tmp / SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return target


def _settings(model: str, model_sha256: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"model": model, "weights_sha256": model_sha256, "params": dict(params)}


def _summary(record: Mapping[str, Any], out: str, cached: bool) -> dict[str, Any]:
    return {
        "model": record["model"]["name"],
        "record_dir": out,
        "cached": cached,
        "seconds": float((record.get("seconds") or {}).get("total", 0.0)),
        "top1_share": record["observation"]["mean"]["top1_share"],
        "ablation": {
            k: record["ablation"].get(k) for k in ("metric", "dense", "top", "random_mean")
        },
    }


def observation_worker(
    model: str, model_sha256: str | None, params: dict[str, Any], out: str, command: str
) -> dict[str, Any]:
    """Ray task body: observation_job on this worker's device and threads, then the folder."""
    from ffsplit.jobs import observation_job

    target = Path(out)
    settings = _settings(model, model_sha256, params)
    record = _complete(target, settings)
    if record is not None:
        return _summary(record, out, True)
    release_worker_caches()  # base models and statistics of other stages: this job loads its own
    set_task_threads()
    record = observation_job(model, device=task_device(), command=command, **params)
    check_model_sha(model, str(record["model"].get("weights_sha256", "")), model_sha256)
    write_record_dir(record, target, settings)
    return _summary(record, out, False)


def run_observation(
    model: str, model_sha256: str | None, params: dict[str, Any], out: str, command: str
) -> dict[str, Any]:
    """The observation of one model on Ray (a whole node's CPUs, or a GPU); a complete folder
    returns at once (made with the same model, weights and parameters)."""
    record = _complete(Path(out), _settings(model, model_sha256, params))
    if record is not None:
        return _summary(record, out, True)
    return run_remote(
        observation_worker,
        model,
        model_sha256,
        params,
        out,
        command,
        resources=task_resources(cpus=node_cpus()),
    )


@prefect_task(name="observe")
def observe(
    model: str, model_sha256: str | None, params: dict[str, Any], out: str, command: str
) -> dict[str, Any]:
    """Prefect task: the observation record folder of one base model (ffsplit.jobs.observation_job)."""
    return run_observation(model, model_sha256, params, out, command)


# ------------------------------------------------------------------------------------- MLflow


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
    from tasks.registry import MAX_PARAM_LENGTH, redact

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
    from tasks.registry import COMPLETE_TAG, CONTENT_TAG, ROLE_TAG

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
    from tasks.registry import RegistryError, _artifact_exists

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
    from tasks.registry import (
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
    it is). uri: MLFLOW_TRACKING_URI, else the local stack's server (tasks.registry.tracking_uri).
    """
    from tasks.observation_plots import observation_plots
    from tasks.registry import _check_tags, _connect, _retrying

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
