"""Observation stage (issue 6): the paper's premise measured on a base model, as a record folder.

`observe` runs ffsplit.jobs.observation_job as one Ray task (a whole node's CPUs, or a GPU when the
cluster has one) and writes a record folder atomically: observation.json (the job's record), its
plots (reports.observation_plots) and settings.json (model, weights sha256, parameters). A complete
folder made with the same settings is returned as it is, so a resumed flow does not recompute it.
Logging a record folder in MLflow is tracking/observation.py's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError
from tasks.records import ObservationRecord
from tasks.runtime import (
    check_model_sha,
    node_cpus,
    release_worker_caches,
    set_task_threads,
    task_device,
    task_resources,
)
from tasks.stage import stage

RECORD = "observation.json"
SETTINGS = "settings.json"  # in a flow's record folder: the model and parameters that made it
PLOTS = ("observation.png", "ablation.png")
HIDDEN_PLOT = "ablation_hidden.png"  # encoders only: the relative error of the hidden states
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
    """The PNG files a record's folder holds (reports.observation_plots.observation_plots)."""
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
    from reports.observation_plots import observation_plots

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


def _summary(record: Mapping[str, Any], out: str, cached: bool) -> ObservationRecord:
    ablation = record["ablation"]
    return ObservationRecord(
        path=out,
        model=record["model"]["name"],
        cached=cached,
        seconds=float((record.get("seconds") or {}).get("total", 0.0)),
        top1_share=record["observation"]["mean"]["top1_share"],
        ablation={k: ablation.get(k) for k in ("metric", "dense", "top", "random_mean")},
    )


def finished_observation(
    model: str, model_sha256: str | None, params: dict[str, Any], out: str, **_: Any
) -> ObservationRecord | None:
    """The record of a complete folder made with the same model, weights and parameters."""
    record = _complete(Path(out), _settings(model, model_sha256, params))
    return None if record is None else _summary(record, out, True)


@stage("observe", done=finished_observation, resources=lambda **_: task_resources(cpus=node_cpus()))
def observe(
    *, model: str, model_sha256: str | None, params: dict[str, Any], out: str, command: str
) -> ObservationRecord:
    """The observation of one base model (ffsplit.jobs.observation_job) as a record folder, on
    this worker's device and threads (a whole node's CPUs, or a GPU)."""
    from ffsplit.jobs import observation_job

    release_worker_caches()  # base models and statistics of other stages: this job loads its own
    set_task_threads()
    record = observation_job(model, device=task_device(), command=command, **params)
    check_model_sha(model, str(record["model"].get("weights_sha256", "")), model_sha256)
    write_record_dir(record, Path(out), _settings(model, model_sha256, params))
    return _summary(record, out, False)
