"""The `compress` flow (one model, one recipe, one registered variant) and the stages both flows share.

profile (a Ray task per calibration unit) -> aggregate -> compress (a Ray task per layer shard) ->
assemble -> heal (when recipe.heal.steps > 0: a short distillation against the dense model) ->
evaluate (the variant, and the dense reference for the quality change) -> register in MLflow.
Parameters, the model, the MLflow store and the Prefect API are all checked before any work.
Every artifact is keyed by content in the cache (tasks/cache.py) and written atomically, so a
re-run with the same inputs, or a run started again after being killed, skips what is done.

CLI: ``python -m flows.compress --model smollm2-135m --recipe recipe.json [--eval-tokens N ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from ffsplit.config import ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.aggregate import aggregate, aggregate_path, stats_file
from tasks.assemble import assemble
from tasks.compress import compress_shard, layer_shards, shard_plan
from tasks.evaluate import LATENCY_WORKLOAD, eval_params, evaluate
from tasks.evaluate import metrics as quality_metrics
from tasks.heal import heal_variant, unhealed
from tasks.profile import MODES, profile_unit, unit_plan
from tasks.runtime import check_prefect_api, ray_session, run_remote, task_resources

# Threads only wait on Ray here; the Ray cluster's resources bound the real parallelism.
TASK_RUNNER_THREADS = 64
DEFAULT_MODEL = "smollm2-135m"


# ------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: the name workers load it by, its weights hash and FFN layer count."""

    name: str
    sha256: str
    layers: int
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_base(model: str) -> BaseModel:
    """Resolve a packaged name or a local folder; it must have a tokenizer (text in, text out)."""
    from ffsplit.models.loading import TOKENIZER_FILES
    from ffsplit.models.registry import resolve_model
    from ffsplit.profiling.sequential import count_layers

    if not isinstance(model, str) or not model.strip():
        raise FFSplitError(f"model must be a packaged model name or a folder, got {model!r}")
    ref = resolve_model(model)
    if not any((ref.path / name).is_file() for name in TOKENIZER_FILES):
        raise FFSplitError(
            f"model {model!r} ({ref.path}) has no tokenizer files: the pipeline profiles and "
            "evaluates on text; add the tokenizer to the folder"
        )
    return BaseModel(
        name=model, sha256=ref.weights_sha256, layers=count_layers(ref.path), path=str(ref.path)
    )


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FFSplitError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class PipelineSettings:
    """How the stages run (not what they compute, except units/shards which fix the float order)."""

    cache_dir: str
    eval: dict[str, Any]
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


def parse_recipe(recipe: dict[str, Any] | None, calib_tokens: int | None = None) -> Recipe:
    """A Recipe from a dict (unknown keys are errors); calib_tokens overrides profile.tokens."""
    data = dict(recipe or {})
    if calib_tokens is not None:
        _positive_int("calib_tokens", calib_tokens, 2)
        profile = dict(data.get("profile") or {})
        profile["tokens"] = calib_tokens
        data["profile"] = profile
    return check_recipe(Recipe.from_dict(data))


def check_recipe(recipe: Recipe) -> Recipe:
    """Settings that only fail together: activation-aware compressors need the Gram matrices."""
    from ffsplit.compress.recipe import needs_statistics

    wants_grams = (recipe.method == "lowrank" and recipe.lowrank.whiten) or (
        recipe.method == "quant" and recipe.quant.gptq
    )
    if wants_grams and needs_statistics(recipe) and not recipe.profile.collect_grams:
        what = "lowrank.whiten" if recipe.method == "lowrank" else "quant.gptq"
        raise FFSplitError(
            f"recipe '{recipe.label}': {what} needs Gram matrices, but profile.collect_grams is "
            f"false; set profile.collect_grams true or {what} false"
        )
    return recipe


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
    import re

    if name:
        return name
    stem = Path(base.name).name if Path(base.name).is_dir() else base.name
    return "ffsplit-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")


def run_folder(run_dir: str | None, kind: str) -> Path:
    """Where a run writes its tables and charts: run_dir, else FFSPLIT_HOME/runs/KIND-TIME-NAME."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    import os

    from prefect.runtime import flow_run

    home = os.environ.get("FFSPLIT_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".ffsplit"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = flow_run.name or "local"
    return (base / "runs" / f"{kind}-{stamp}-{name}").resolve()


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


# ---------------------------------------------------------------------------------------- stages


@task(name="register", cache_policy=NONE)
def register_version(
    variant_dir: str,
    model_name: str,
    metrics: dict[str, float],
    artifacts: dict[str, str],
    tags: dict[str, str],
) -> dict[str, Any]:
    """Prefect task: one complete MLflow model version (tracking.registry: all or nothing)."""
    from tracking.registry import register_variant

    started = time.perf_counter()
    version = register_variant(
        variant_dir, model_name=model_name, metrics=metrics, artifacts=artifacts, tags=tags
    )
    return {**asdict(version), "seconds": time.perf_counter() - started}


@task(name="score-plot", cache_policy=NONE)
def score_plot(stats_path: str, model: str, out: str) -> str:
    """Prefect task: the neuron score distribution chart of the merged statistics (on Ray)."""
    from reports.plots import score_distribution_plot

    if not Path(out).is_file():
        run_remote(
            score_distribution_plot,
            stats_path,
            model,
            out,
            resources=task_resources(cpus=1, gpu=False),
        )
    cache.mark_used(out)
    return out


class Stages:
    """The pipeline's stages inside a flow run: each submits Prefect tasks (bodies on Ray), waits,
    and records its wall time."""

    def __init__(self, base: BaseModel, settings: PipelineSettings) -> None:
        self.base = base
        self.settings = settings
        self.root = Path(settings.cache_dir)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def profile(self, profile: ProfileConfig) -> dict[str, Any]:
        """Unit statistics (fan-out), then their merge: the aggregate record with its key and path."""
        s = self.settings
        config = profile.to_dict()
        plan = unit_plan(
            self.base.sha256,
            config,
            s.profile_units,
            str(self.root),
            s.profile_mode,
            s.layer_group_size,
        )
        with self.timed("profile"):
            futures = [
                profile_unit.submit(
                    self.base.name,
                    self.base.sha256,
                    config,
                    p["unit"],
                    s.profile_units,
                    p["path"],
                    s.profile_mode,
                    s.layer_group_size,
                    s.memory_cap_mb,
                )
                for p in plan
            ]
            units = [f.result() for f in futures]
        key, folder = aggregate_path(str(self.root), [p["key"] for p in plan])
        with self.timed("aggregate"):
            record = aggregate.submit(
                self.base.name, self.base.sha256, [p["path"] for p in plan], folder
            ).result()
        cache.mark_used(folder, *(p["path"] for p in plan))
        return {
            "key": key,
            "dir": folder,
            "stats_path": str(stats_file(folder)),
            "units": units,
            "aggregate": record,
            "calibration": record.get("calibration"),
            "cached": all(u["cached"] for u in units) and record["cached"],
            "profile_seconds": sum(float(u.get("seconds") or 0) for u in units),
        }

    def compress(self, recipes: list[Recipe], stats: dict[str, Any] | None) -> list[dict[str, Any]]:
        """All shards of all recipes at once (Ray runs as many as it has CPUs/GPUs for)."""
        from ffsplit.compress.recipe import needs_statistics

        shards = layer_shards(self.base.layers, self.settings.compress_shards)
        jobs = []
        for recipe in recipes:
            uses = stats if needs_statistics(recipe) else None
            if needs_statistics(recipe) and stats is None:
                raise FFSplitError(f"recipe '{recipe.label}' needs statistics; profile first")
            # shards are the recipe's compression alone: healing comes after assembly (heal)
            plan = shard_plan(
                self.base.sha256,
                uses and uses["key"],
                unhealed(recipe).to_dict(),
                shards,
                str(self.root),
            )
            jobs.append((recipe, uses, plan))
        with self.timed("compress"):
            submitted = [
                (
                    recipe,
                    uses,
                    plan,
                    [
                        compress_shard.with_options(
                            task_run_name=f"compress-{unhealed(recipe).label}-layers-{p['layers'][0]}-{p['layers'][-1]}"
                        ).submit(
                            self.base.name,
                            self.base.sha256,
                            uses and uses["stats_path"],
                            unhealed(recipe).to_dict(),
                            p["layers"],
                            p["path"],
                        )
                        for p in plan
                    ],
                )
                for recipe, uses, plan in jobs
            ]
            out = []
            for recipe, uses, plan, futures in submitted:
                results = [f.result() for f in futures]
                cache.mark_used(*(p["path"] for p in plan))
                out.append({"recipe": recipe, "stats": uses, "plan": plan, "shards": results})
        return out

    def assemble(self, compressed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A variant folder per recipe, from its shards (content-keyed)."""
        s = self.settings
        with self.timed("assemble"):
            futures = []
            for item in compressed:
                recipe, uses, plan = item["recipe"], item["stats"], item["plan"]
                key = cache.variant_key(self.base.sha256, [p["key"] for p in plan])
                out = str(cache.variant_dir(self.root, key))
                extra = {
                    "pipeline": {
                        "profile_units": s.profile_units if uses else None,
                        "compress_shards": len(plan),
                        "stats_key": uses and uses["key"],
                        "variant_key": key,
                    }
                }
                compression = unhealed(recipe)
                future = assemble.with_options(
                    task_run_name=f"assemble-{compression.label}"
                ).submit(
                    self.base.name,
                    self.base.sha256,
                    compression.to_dict(),
                    [p["path"] for p in plan],
                    out,
                    uses and uses["calibration"],
                    extra,
                )
                futures.append((item, key, future))
            out_items = []
            for item, key, future in futures:
                variant = future.result()
                cache.mark_used(variant["path"])
                out_items.append(
                    {
                        **item,
                        "key": key,
                        "variant": variant,
                        "compress_seconds": sum(
                            float(r.get("compress_seconds") or 0) for r in item["shards"]
                        ),
                        "cached": all(r["cached"] for r in item["shards"]) and variant["cached"],
                    }
                )
        return out_items

    def heal(self, assembled: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Heal the variants whose recipe asks for it (one Ray task each, content-keyed by the
        assembled variant and the heal config); the others pass through unchanged. A healed item's
        key and variant become the healed folder's; the assembled one stays under 'unhealed'."""
        todo = [item for item in assembled if item["recipe"].heal.enabled]
        if not todo:
            return assembled
        with self.timed("heal"):
            futures = []
            for item in todo:
                config = item["recipe"].heal.to_dict()
                key = cache.heal_key(item["key"], config)
                future = heal_variant.with_options(
                    task_run_name=f"heal-{item['recipe'].label}"
                ).submit(
                    self.base.name,
                    self.base.sha256,
                    item["variant"]["path"],
                    config,
                    str(cache.healed_dir(self.root, key)),
                )
                futures.append((item, key, future))
            for item, key, future in futures:
                healed = future.result()
                cache.mark_used(healed["path"])
                item["unhealed"] = {"key": item["key"], "variant": item["variant"]}
                item["key"] = key
                item["variant"] = healed
                item["cached"] = item["cached"] and healed["cached"]
        return assembled

    def submit_evaluation(
        self, subject: str, subject_key: str, label: str, params: dict[str, Any] | None = None
    ) -> PrefectFuture:
        """An evaluation (Ray, a node's CPUs) of a variant folder or the base model."""
        params = params or self.settings.eval
        out = str(cache.eval_path(self.root, cache.eval_key(subject_key, params)))
        cache.mark_used(out)  # a new record is young anyway
        return evaluate.with_options(task_run_name=f"evaluate-{label}").submit(subject, params, out)

    def dense_evaluation(self) -> PrefectFuture:
        """The dense base model's quality (no latency: each variant races the dense one itself)."""
        params = {**self.settings.eval, "latency": False}
        for key in LATENCY_WORKLOAD:
            params.pop(key, None)
        return self.submit_evaluation(self.base.name, self.base.sha256, "dense", params)


def heal_metrics(item: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a healed item: healing's wall time and distillation loss before/after."""
    heal = item["variant"].get("heal") if "unhealed" in item else None
    if not heal:
        return {}
    names = {"seconds": "heal_seconds", "before": "heal_loss_before", "after": "heal_loss_after"}
    return {
        metric: float(heal[key])
        for key, metric in names.items()
        if isinstance(heal.get(key), int | float) and math.isfinite(heal[key])
    }


def series_of(recipe: Recipe) -> str:
    """Which line of the Pareto chart a recipe belongs to: ffsplit-<method>, <baseline>-<method>."""
    if recipe.method == "none":
        return "dense"
    baseline = recipe.baseline
    if baseline == "prune":
        return "prune"
    return f"{baseline or 'ffsplit'}-{recipe.method}"


def write_json(path: Path, data: Any) -> Path:
    from ffsplit.files import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------- flow


@flow(
    name="compress",
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS),
    log_prints=True,
)
def compress(
    model: str = DEFAULT_MODEL,
    recipe: dict[str, Any] | None = None,
    calib_tokens: int | None = None,
    eval_tokens: int = 16384,
    eval_window: int = 512,
    latency: bool = True,
    latency_prompt_tokens: int = 128,
    latency_decode_tokens: int = 32,
    latency_repeats: int = 5,
    profile_units: int = 2,
    compress_shards: int = 4,
    profile_mode: str = "units",
    layer_group_size: int | None = None,
    memory_cap_mb: float | None = None,
    register_as: str | None = None,
    register_model: bool = True,
    run_dir: str | None = None,
    cache_dir: str | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Compress one model by one recipe, evaluate it against the dense model, register it.

    recipe: a Recipe dict (ffsplit.config; unknown keys are errors), calib_tokens overrides its
    profile.tokens. profile_units / compress_shards fix how work is cut (not the worker count);
    profile_mode 'layer_groups' profiles layer_group_size layers per task for models too large for
    one worker (memory_cap_mb: most weights one worker may hold). latency_*: the latency race's
    workload (prompt tokens, greedy decode steps, rounds), dense and variant interleaved.
    """
    started = time.perf_counter()
    # ---- validation: everything before any work
    parsed = parse_recipe(recipe, calib_tokens)
    settings = PipelineSettings(
        cache_dir=str(cache.cache_root(cache_dir)),
        eval=eval_params(
            eval_tokens,
            eval_window,
            latency=latency,
            prompt_tokens=latency_prompt_tokens,
            decode_tokens=latency_decode_tokens,
            repeats=latency_repeats,
        ),
        profile_units=profile_units,
        compress_shards=compress_shards,
        profile_mode=profile_mode,
        layer_group_size=layer_group_size,
        memory_cap_mb=memory_cap_mb,
        ray_cpus=ray_cpus,
    )
    check_calibration(parsed.profile, profile_units)
    base = resolve_base(model)
    check_memory_cap(base, settings)
    model_name = registered_name(base, register_as)
    services = check_services(register_model)
    folder = run_folder(run_dir, "compress")
    validated = time.perf_counter() - started
    print(
        f"compress {base.name} by {parsed.label}: cache {settings.cache_dir}, run folder {folder}"
    )

    from ffsplit.compress.recipe import needs_statistics

    ray_started = time.perf_counter()
    with ray_session(num_cpus=ray_cpus) as cluster:
        stages = Stages(base, settings)
        stages.seconds["validate"] = validated
        stages.seconds["ray_start"] = time.perf_counter() - ray_started
        stats = stages.profile(parsed.profile) if needs_statistics(parsed) else None
        plot = None
        if stats is not None and register_model:  # a registration artifact: no one else reads it
            plot = score_plot.submit(
                stats["stats_path"],
                base.name,
                str(cache.cache_root(settings.cache_dir) / "plots" / f"{stats['key']}-scores.png"),
            )
        [item] = stages.heal(stages.assemble(stages.compress([parsed], stats)))
        with stages.timed("evaluate"):
            dense_future = stages.dense_evaluation()
            record = stages.submit_evaluation(
                item["variant"]["path"], item["key"], parsed.label
            ).result()
            dense = dense_future.result()
        metrics = quality_metrics(record, dense)
        metrics["compress_seconds"] = item["compress_seconds"]
        metrics.update(heal_metrics(item))
        if stats is not None:
            metrics["profile_seconds"] = stats["profile_seconds"]
        registered = None
        if register_model:
            with stages.timed("register"):
                artifacts = {"eval/record.json": record["record_path"]}
                if plot is not None:
                    artifacts["plots/scores.png"] = plot.result()
                registered = register_version.submit(
                    item["variant"]["path"],
                    model_name,
                    metrics,
                    artifacts,
                    {
                        "ffsplit.flow": "compress",
                        "ffsplit.series": series_of(parsed),
                        "ffsplit.variant_key": item["key"],
                        **provenance_tags("compress", folder),
                    },
                ).result()
    summary = {
        "flow": "compress",
        "model": base.to_dict(),
        "recipe": parsed.to_dict(),
        "label": parsed.label,
        "variant": item["variant"]["path"],
        "variant_key": item["key"],
        "metrics": metrics,
        "dense": quality_metrics(dense, None),
        "registered": registered,
        "registered_name": model_name if register_model else None,
        "cached": {
            "profile": None if stats is None else stats["cached"],
            "variant": item["cached"],
            "evaluation": record["cached"],
            **({"heal": item["variant"]["cached"]} if "unhealed" in item else {}),
        },
        **({"unhealed_variant": item["unhealed"]["variant"]["path"]} if "unhealed" in item else {}),
        "stage_seconds": stages.seconds,
        "seconds": time.perf_counter() - started,
        "cluster": cluster,
        "services": services,
        "run_dir": str(folder),
    }
    write_json(folder / "summary.json", summary)
    print(
        json.dumps(
            {k: summary[k] for k in ("label", "variant", "metrics", "registered")},
            indent=1,
            default=str,
        )
    )
    return summary


# -------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.compress`: check the Prefect API, then run the flow; errors in one line."""
    parser = argparse.ArgumentParser(prog="python -m flows.compress", description=compress.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--recipe", type=Path, default=None, help="recipe JSON or YAML file")
    parser.add_argument("--calib-tokens", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--profile-units", type=int, default=2)
    parser.add_argument("--compress-shards", type=int, default=4)
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)
    try:
        recipe = None
        if args.recipe is not None:
            from ffsplit.cli import load_recipe

            recipe = load_recipe(args.recipe).to_dict()
        check_prefect_api()
        compress(
            model=args.model,
            recipe=recipe,
            calib_tokens=args.calib_tokens,
            eval_tokens=args.eval_tokens,
            profile_units=args.profile_units,
            compress_shards=args.compress_shards,
            register_model=not args.no_register,
            run_dir=args.run_dir,
        )
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
