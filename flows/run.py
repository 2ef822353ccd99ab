"""What every flow run does before any work, and the registration tasks the flows share.

`start_run` is the one preamble of the compress and sweep flows (and, for its parts, of the
observation flow): it checks the settings, resolves the base model (a tokenizer is required: the
pipeline profiles and evaluates on text), checks that every recipe's budget fits the model's FFN
shapes, checks the worker memory cap, that the Prefect API and
(when registering) the MLflow store answer, and picks the run folder. A bad input fails there, in
one line, before Ray starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ffsplit.config import EvalConfig, ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.profile import MODES
from tasks.records import BaseModel, Statistics
from tasks.runtime import check_prefect_api, run_remote, task_resources

DEFAULT_MODEL = "smollm2-135m"


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FFSplitError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class PipelineSettings:
    """How the stages run (not what they compute, except units/shards which fix the float order)."""

    cache_dir: str
    eval: EvalConfig
    profile_units: int = 2
    compress_shards: int = 4
    profile_mode: str = "units"
    layer_group_size: int | None = None
    memory_cap_mb: float | None = None
    ray_cpus: int | None = None

    def __post_init__(self) -> None:
        _positive_int("profile_units", self.profile_units)
        _positive_int("compress_shards", self.compress_shards)
        if self.profile_mode not in MODES:
            raise FFSplitError(
                f"profile_mode must be one of {', '.join(MODES)}, got {self.profile_mode!r}"
            )
        if self.profile_mode == "layer_groups":
            _positive_int("layer_group_size", self.layer_group_size)
        if self.memory_cap_mb is not None and (
            isinstance(self.memory_cap_mb, bool)
            or not isinstance(self.memory_cap_mb, int | float)
            or not math.isfinite(self.memory_cap_mb)
            or self.memory_cap_mb <= 0
        ):
            raise FFSplitError(
                f"memory_cap_mb must be a positive number of MB, got {self.memory_cap_mb!r}"
            )
        if self.ray_cpus is not None:
            _positive_int("ray_cpus", self.ray_cpus)


@dataclass(frozen=True)
class Run:
    """A flow run after its checks: the base model, the settings, the services, the run folder."""

    kind: str
    base: BaseModel
    settings: PipelineSettings
    services: dict[str, str | None]
    folder: Path
    started: float  # perf_counter at the flow's start
    validate_seconds: float


def resolve_base(model: str) -> BaseModel:
    """Resolve a packaged name or a local folder (tasks.records.BaseModel.resolve)."""
    return BaseModel.resolve(model)


def weights_mb(path: str | Path) -> float:
    """Model weights in MB at the float32 compute dtype, from the safetensors headers alone."""
    from safetensors import safe_open

    elements = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                elements += math.prod(shape)
    return elements * 4 / 2**20


def check_memory_cap(base: BaseModel, settings: PipelineSettings) -> None:
    """A whole-model profile ('units' mode) must fit the worker memory cap; say what to do if not."""
    if settings.memory_cap_mb is None or settings.profile_mode != "units":
        return
    size = weights_mb(base.path)
    if size > settings.memory_cap_mb:
        raise FFSplitError(
            f"model {base.name!r} needs {size:.1f} MB of weights in one worker, over "
            f"memory_cap_mb={settings.memory_cap_mb:g}: use profile_mode='layer_groups' with a "
            "layer_group_size that fits"
        )


def check_calibration(profile: ProfileConfig, units: int) -> None:
    """Every calibration unit must get at least one window."""
    windows = profile.tokens // profile.window
    if units > windows:
        raise FFSplitError(
            f"profile_units={units} exceeds the {windows} calibration windows "
            f"({profile.tokens} tokens / window {profile.window}); use fewer units or more tokens"
        )


def check_services(register: bool) -> dict[str, str | None]:
    """The Prefect API (when one is configured) and, when registering, the MLflow store answer."""
    services: dict[str, str | None] = {"prefect": check_prefect_api(), "mlflow": None}
    if register:
        from tracking.registry import check_reachable, redact, tracking_uri

        uri = tracking_uri()
        check_reachable(uri)
        services["mlflow"] = redact(uri)
    return services


def registered_name(base: BaseModel, name: str | None) -> str:
    """MLflow registered model name: given, else 'ffsplit-<model>' (folder name for local models)."""
    if name:
        return name
    stem = Path(base.name).name if Path(base.name).is_dir() else base.name
    return "ffsplit-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")


def run_folder(run_dir: str | None, kind: str) -> Path:
    """Where a run writes its tables and charts: run_dir, else FFSPLIT_HOME/runs/KIND-TIME-NAME."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    from prefect.runtime import flow_run

    home = os.environ.get("FFSPLIT_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".ffsplit"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = flow_run.name or "local"
    return (base / "runs" / f"{kind}-{stamp}-{name}").resolve()


def check_budgets(base: BaseModel, recipes: Sequence[Recipe]) -> None:
    """Refuse a budget that no FFN of the model can meet, from the config's shapes (the model on
    the meta device: no weights read): before profiling, as compress_job does for the CLI."""
    if not recipes:
        return
    from transformers import AutoConfig

    from ffsplit.adapters import get_adapter
    from ffsplit.compress.recipe import check_budget
    from ffsplit.models.loading import empty_model

    config = AutoConfig.from_pretrained(base.path, local_files_only=True)
    skeleton = empty_model(config, base.path)
    adapter = get_adapter(skeleton)
    for recipe in recipes:
        try:
            check_budget(skeleton, recipe, adapter)
        except FFSplitError as exc:
            raise FFSplitError(f"recipe {recipe.label!r}: {exc}") from None


def start_run(
    kind: str,
    model: str,
    settings: PipelineSettings,
    profile: ProfileConfig | None,
    *,
    register: bool,
    run_dir: str | None,
    started: float,
    recipes: Sequence[Recipe] = (),
) -> Run:
    """Every check of a flow run, before any work (see the module docstring)."""
    if profile is not None:
        check_calibration(profile, settings.profile_units)
    base = resolve_base(model)
    check_budgets(base, recipes)
    check_memory_cap(base, settings)
    services = check_services(register)
    folder = run_folder(run_dir, kind)
    return Run(kind, base, settings, services, folder, started, time.perf_counter() - started)


# The parameters every pipeline flow (compress, sweep) takes for how its stages run.
HOW_PARAMETERS = (
    "profile_units",
    "compress_shards",
    "profile_mode",
    "layer_group_size",
    "memory_cap_mb",
    "ray_cpus",
)


def settings_from(params: Mapping[str, Any]) -> PipelineSettings:
    """PipelineSettings from a pipeline flow's parameters (its locals() at the start): how the
    stages run, the evaluation and its latency race, the cache root (FFSPLIT_HOME/cache by
    default). Validated; one place for both flows."""
    evaluation = EvalConfig(
        tokens=params["eval_tokens"],
        window=params["eval_window"],
        latency=params["latency"],
        prompt_tokens=params["latency_prompt_tokens"],
        decode_tokens=params["latency_decode_tokens"],
        repeats=params["latency_repeats"],
    )
    return PipelineSettings(
        cache_dir=str(cache.cache_root(params["cache_dir"])),
        eval=evaluation,
        **{name: params[name] for name in HOW_PARAMETERS},
    )


def provenance_tags(kind: str, folder: Path) -> dict[str, str]:
    """MLflow tags that say how a registered variant was made: the run folder, and a command that
    reruns the flow (the deployment run with its parameters, or the CLI line), so the results
    page can cite both. Read inside a flow run (prefect.runtime)."""
    import shlex

    from prefect.runtime import deployment, flow_run

    from tracking.registry import MAX_TAG_LENGTH

    params = {k: v for k, v in (flow_run.parameters or {}).items() if v is not None}
    if deployment.name:
        args = [f"{kind}/{deployment.name}"]
        for key, value in sorted(params.items()):
            args += ["--param", f"{key}={json.dumps(value)}"]
        command = shlex.join(["prefect", "deployment", "run", *args])
    elif Path(sys.argv[0]).name == f"{kind}.py" and Path(sys.argv[0]).parent.name == "flows":
        command = shlex.join(["python", "-m", f"flows.{kind}", *sys.argv[1:]])
    else:
        command = f"flows.{kind}.{kind}(**{json.dumps(params, sort_keys=True)})"
    tags = {"ffsplit.run_dir": str(folder), "ffsplit.command": command[:MAX_TAG_LENGTH]}
    if flow_run.id:
        tags["ffsplit.flow_run_id"] = str(flow_run.id)
    return tags


def write_json(path: Path, data: Any) -> Path:
    from ffsplit.files import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


# -------------------------------------------------------------------- tasks the flows share


@task(name="register", cache_policy=NONE)
def register_version(
    variant_dir: str,
    model_name: str,
    metrics: dict[str, float],
    artifacts: dict[str, str],
    tags: dict[str, str],
) -> dict[str, Any]:
    """Prefect task: one complete MLflow model version (tracking.registry: all or nothing)."""
    from dataclasses import asdict

    from tracking.registry import register_variant

    started = time.perf_counter()
    version = register_variant(
        variant_dir, model_name=model_name, metrics=metrics, artifacts=artifacts, tags=tags
    )
    return {**asdict(version), "seconds": time.perf_counter() - started}


@task(name="score-plot", cache_policy=NONE)
def score_plot(stats: Statistics, model: str, cache_dir: str) -> str:
    """Prefect task: the neuron score distribution chart of the merged statistics (on Ray)."""
    from reports.plots import score_distribution_plot

    out = str(cache.cache_root(cache_dir) / "plots" / f"{stats.key}-scores.png")
    if not Path(out).is_file():
        run_remote(
            score_distribution_plot,
            stats.stats_path,
            model,
            out,
            resources=task_resources(cpus=1, gpu=False),
        )
    cache.mark_used(out)
    return out
