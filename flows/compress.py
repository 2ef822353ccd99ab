"""The `compress` flow: one model, one recipe, one evaluated and registered variant.

profile (a Ray task per calibration unit) -> aggregate -> compress (a Ray task per layer shard) ->
assemble -> heal (when recipe.heal.steps > 0: a short distillation against the dense model) ->
evaluate (the variant, and the dense reference for the quality change) -> register in MLflow
(flows/stages.py runs the stages; flows/run.py checks everything before any work).

CLI: ``python -m flows.compress --model smollm2-135m --recipe recipe.json [--eval-tokens N ...]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from ffsplit.config import DEFAULT_EVAL_TOKENS, DEFAULT_WINDOW, EvalConfig, Recipe
from ffsplit.errors import FFSplitError
from flows.run import (
    DEFAULT_MODEL,
    Run,
    provenance_tags,
    register_version,
    registered_name,
    score_plot,
    settings_from,
    start_run,
    write_json,
)
from flows.stages import TASK_RUNNER_THREADS, Stages, VariantRun, run_metrics
from tasks.evaluate import metrics as quality_metrics
from tasks.records import Evaluation
from tasks.runtime import check_prefect_api, ray_session

LATENCY = EvalConfig()  # the latency race's default workload


def parse_recipe(recipe: dict[str, Any] | None, calib_tokens: int | None = None) -> Recipe:
    """A Recipe from a dict (unknown keys are errors); calib_tokens overrides profile.tokens."""
    data = dict(recipe or {})
    if calib_tokens is not None:
        if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 2:
            raise FFSplitError(f"calib_tokens must be an integer >= 2, got {calib_tokens!r}")
        data["profile"] = {**dict(data.get("profile") or {}), "tokens": calib_tokens}
    return Recipe.from_dict(data)


def _register(run: Run, item: VariantRun, metrics: dict[str, float], plot: Any, name: str) -> Any:
    """The variant as one MLflow model version, with its evaluation record and score chart."""
    assert item.evaluation is not None
    artifacts = {"eval/record.json": item.evaluation.path}
    if plot is not None:
        artifacts["plots/scores.png"] = plot.result()
    tags = {
        "ffsplit.flow": "compress",
        "ffsplit.series": item.recipe.series,
        "ffsplit.variant_key": item.folder.key,
        **provenance_tags("compress", run.folder),
    }
    return register_version.submit(item.folder.path, name, metrics, artifacts, tags).result()


def _summary(
    run: Run, item: VariantRun, dense: Evaluation, metrics: dict[str, float], **more: Any
) -> dict[str, Any]:
    assert item.evaluation is not None
    cached = {
        "profile": None if item.stats is None else item.stats.cached,
        "variant": all(s.cached for s in item.shards) and item.folder.cached,
        "evaluation": item.evaluation.cached,
    }
    if item.unhealed is not None:
        cached["heal"] = item.folder.cached
    summary = {
        "flow": "compress",
        "model": run.base.to_dict(),
        "recipe": item.recipe.to_dict(),
        "label": item.recipe.label,
        "variant": item.folder.path,
        "variant_key": item.folder.key,
        "metrics": metrics,
        "dense": quality_metrics(dense.record, None),
        "cached": cached,
        "services": run.services,
        "run_dir": str(run.folder),
        **more,
    }
    if item.unhealed is not None:
        summary["unhealed_variant"] = item.unhealed.path
    summary["stages"] = _stage_records(item, dense)
    return summary


def _stage_records(item: VariantRun, dense: Evaluation) -> dict[str, Any]:
    """What each stage handed on (paths, seconds, where it ran), for the run's summary."""
    from prefect.runtime import flow_run

    evaluation = item.evaluation
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "units": [u.to_dict() for u in item.stats.units] if item.stats else [],
        "aggregate": item.stats.merged.to_dict() if item.stats else None,
        "shards": [s.to_dict() for s in item.shards],
        "variant": item.folder.to_dict(),
        "evaluation": {
            "path": evaluation.path,
            "cached": evaluation.cached,
            "device": evaluation.device,
            "seconds": evaluation.record.get("seconds"),
        }
        if evaluation
        else None,
        "dense_evaluation": {"path": dense.path, "cached": dense.cached, "device": dense.device},
    }


@flow(
    name="compress",
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS),
    log_prints=True,
)
def compress(
    model: str = DEFAULT_MODEL,
    recipe: dict[str, Any] | None = None,
    calib_tokens: int | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    eval_window: int = DEFAULT_WINDOW,
    latency: bool = True,
    latency_prompt_tokens: int = LATENCY.prompt_tokens,
    latency_decode_tokens: int = LATENCY.decode_tokens,
    latency_repeats: int = LATENCY.repeats,
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
    parsed = parse_recipe(recipe, calib_tokens)
    settings = settings_from(locals())
    run = start_run(
        "compress",
        model,
        settings,
        parsed.profile if parsed.needs_statistics else None,
        register=register_model,
        run_dir=run_dir,
        started=started,
        recipes=[parsed],
    )
    model_name = registered_name(run.base, register_as)
    print(
        f"compress {run.base.name} by {parsed.label}: cache {settings.cache_dir}, run folder {run.folder}"
    )
    ray_started = time.perf_counter()
    with ray_session(num_cpus=ray_cpus) as cluster:
        stages = Stages(run.base, settings)
        stages.seconds["validate"] = run.validate_seconds
        stages.seconds["ray_start"] = time.perf_counter() - ray_started
        stats = stages.profile(parsed.profile) if parsed.needs_statistics else None
        plot = None
        if stats is not None and register_model:  # a registration artifact: no one else reads it
            plot = score_plot.submit(stats, run.base.name, settings.cache_dir)
        [item] = stages.heal(stages.assemble(stages.compress([parsed], stats)))
        [item], dense = stages.evaluate([item])
        metrics = run_metrics(item, dense)
        registered = None
        if register_model:
            with stages.timed("register"):
                registered = _register(run, item, metrics, plot, model_name)
    summary = _summary(
        run,
        item,
        dense,
        metrics,
        registered=registered,
        registered_name=model_name if register_model else None,
        stage_seconds=stages.seconds,
        seconds=time.perf_counter() - started,
        cluster=cluster,
    )
    write_json(run.folder / "summary.json", summary)
    shown = {k: summary[k] for k in ("label", "variant", "metrics", "registered")}
    print(json.dumps(shown, indent=1, default=str))
    return summary


# -------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.compress`: check the Prefect API, then run the flow; errors in one line."""
    parser = argparse.ArgumentParser(prog="python -m flows.compress", description=compress.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--recipe", type=Path, default=None, help="recipe JSON or YAML file")
    parser.add_argument("--calib-tokens", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
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
