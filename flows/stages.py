"""The pipeline's stages inside a flow run, shared by the compress and sweep flows.

profile (a Ray task per calibration unit) -> aggregate -> compress (a Ray task per layer shard)
-> assemble -> heal (when the recipe asks) -> evaluate. Each step submits the stages' Prefect
tasks (bodies on Ray, tasks/), waits, records its wall time, and hands on typed records: one
`VariantRun` per recipe, filled in stage by stage. Every artifact is keyed by content in the cache
(tasks/cache.py), so a re-run, or a run started again after being killed, skips what is done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from prefect.futures import PrefectFuture

from ffsplit.config import EvalConfig, ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from flows.run import PipelineSettings
from tasks import cache
from tasks.aggregate import aggregate, aggregate_path
from tasks.assemble import assemble, variant_path
from tasks.compress import compress_shard, layer_shards, shard_path
from tasks.evaluate import evaluate, evaluation_path
from tasks.heal import heal_variant, healed_path
from tasks.profile import unit_paths, unit_stage
from tasks.records import BaseModel, Evaluation, Shard, Statistics, VariantFolder

# Threads only wait on Ray here; the Ray cluster's resources bound the real parallelism.
TASK_RUNNER_THREADS = 64


@dataclass(frozen=True)
class VariantRun:
    """One recipe's way through the stages (each stage fills in its part)."""

    recipe: Recipe
    stats: Statistics | None
    shards: tuple[Shard, ...] = ()
    variant: VariantFolder | None = None
    unhealed: VariantFolder | None = None  # the assembled folder, when healing made `variant`
    evaluation: Evaluation | None = None

    @property
    def folder(self) -> VariantFolder:
        if self.variant is None:
            raise FFSplitError(f"{self.recipe.label}: not assembled yet")
        return self.variant

    @property
    def compress_seconds(self) -> float:
        return sum(float(s.compress_seconds or 0.0) for s in self.shards)

    @property
    def cached(self) -> bool:
        parts = [*self.shards, self.variant, self.evaluation]
        return all(p.cached for p in parts if p is not None)


class Stages:
    """The stages of one flow run over one base model (see the module docstring)."""

    def __init__(self, base: BaseModel, settings: PipelineSettings) -> None:
        self.base = base
        self.settings = settings
        self.root = settings.cache_dir
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def profile(self, profile: ProfileConfig) -> Statistics:
        """Unit statistics (fan-out), then their merge."""
        s = self.settings
        paths = unit_paths(
            self.root, self.base, profile, s.profile_units, s.profile_mode, s.layer_group_size
        )
        extra = {"group_size": s.layer_group_size} if s.profile_mode == "layer_groups" else {}
        with self.timed("profile"):
            futures = [
                unit_stage(s.profile_mode).task.submit(
                    model=self.base,
                    profile=profile.to_dict(),
                    unit=unit,
                    units=s.profile_units,
                    out=out,
                    memory_cap_mb=s.memory_cap_mb,
                    **extra,
                )
                for unit, out in enumerate(paths)
            ]
            units = tuple(f.result() for f in futures)
        with self.timed("aggregate"):
            merged = aggregate.task.submit(
                model=self.base, unit_paths=paths, out=aggregate_path(self.root, paths)
            ).result()
        cache.mark_used(merged.path, *paths)
        return Statistics(units=units, merged=merged)

    def compress(self, recipes: list[Recipe], stats: Statistics | None) -> list[VariantRun]:
        """All shards of all recipes at once (Ray runs as many as it has CPUs/GPUs for).

        Shards are the recipe's compression alone: healing comes after assembly (heal).
        """
        shards = layer_shards(self.base.layers, self.settings.compress_shards)
        jobs = []
        for recipe in recipes:
            if recipe.needs_statistics and stats is None:
                raise FFSplitError(f"recipe '{recipe.label}' needs statistics; profile first")
            uses = stats if recipe.needs_statistics else None
            compression = recipe.unhealed()
            jobs.append((recipe, uses, compression, shards))
        with self.timed("compress"):
            futures = [
                (
                    recipe,
                    uses,
                    [
                        compress_shard.task.with_options(
                            task_run_name=f"compress-{compression.label}-layers-"
                            f"{layers[0]}-{layers[-1]}"
                        ).submit(
                            model=self.base,
                            stats_path=uses and uses.stats_path,
                            recipe=compression.to_dict(),
                            layers=layers,
                            out=shard_path(
                                self.root, self.base, uses and uses.key, compression, layers
                            ),
                        )
                        for layers in layer_groups
                    ],
                )
                for recipe, uses, compression, layer_groups in jobs
            ]
            runs = []
            for recipe, uses, items in futures:
                done = tuple(f.result() for f in items)
                cache.mark_used(*(s.path for s in done))
                runs.append(VariantRun(recipe=recipe, stats=uses, shards=done))
        return runs

    def assemble(self, runs: list[VariantRun]) -> list[VariantRun]:
        """A variant folder per recipe, from its shards (content-keyed)."""
        s = self.settings
        with self.timed("assemble"):
            futures = []
            for run in runs:
                compression = run.recipe.unhealed()
                out = variant_path(self.root, self.base, [x.key for x in run.shards])
                extra = {
                    "pipeline": {
                        "profile_units": s.profile_units if run.stats else None,
                        "compress_shards": len(run.shards),
                        "stats_key": run.stats and run.stats.key,
                        "variant_key": Path(out).name,
                    }
                }
                futures.append(
                    assemble.task.with_options(
                        task_run_name=f"assemble-{compression.label}"
                    ).submit(
                        model=self.base,
                        recipe=compression.to_dict(),
                        shard_paths=[x.path for x in run.shards],
                        out=out,
                        calibration=run.stats and run.stats.merged.calibration,
                        extra=extra,
                    )
                )
            assembled = []
            for run, future in zip(runs, futures, strict=True):
                variant = future.result()
                cache.mark_used(variant.path)
                assembled.append(replace(run, variant=variant))
        return assembled

    def heal(self, runs: list[VariantRun]) -> list[VariantRun]:
        """Heal the variants whose recipe asks for it (one Ray task each, content-keyed by the
        assembled variant and the heal config); the others pass through unchanged."""
        todo = [i for i, run in enumerate(runs) if run.recipe.heal.enabled]
        if not todo:
            return runs
        out = list(runs)
        with self.timed("heal"):
            futures = {
                i: heal_variant.task.with_options(
                    task_run_name=f"heal-{runs[i].recipe.label}"
                ).submit(
                    model=self.base,
                    variant=runs[i].folder.path,
                    heal=runs[i].recipe.heal.to_dict(),
                    out=healed_path(self.root, runs[i].folder, runs[i].recipe.heal),
                )
                for i in todo
            }
            for i, future in futures.items():
                healed = future.result()
                cache.mark_used(healed.path)
                out[i] = replace(runs[i], variant=healed, unhealed=runs[i].variant)
        return out

    def submit_evaluation(
        self, subject: str, subject_key: str, label: str, config: EvalConfig | None = None
    ) -> PrefectFuture:
        """An evaluation (Ray, a node's CPUs) of a variant folder or the base model."""
        config = config or self.settings.eval
        out = evaluation_path(self.root, subject_key, config)
        cache.mark_used(out)  # a new record is young anyway
        return evaluate.task.with_options(task_run_name=f"evaluate-{label}").submit(
            subject=subject, config=config.to_dict(), out=out
        )

    def dense_evaluation(self) -> PrefectFuture:
        """The dense base model's quality (no latency: each variant races the dense one itself)."""
        config = self.settings.eval.replace(latency=False)
        return self.submit_evaluation(self.base.name, self.base.sha256, "dense", config)

    def evaluate(self, runs: list[VariantRun]) -> tuple[list[VariantRun], Evaluation]:
        """Every variant and the dense model, at once; the runs with their evaluation, and the
        dense model's."""
        with self.timed("evaluate"):
            dense_future = self.dense_evaluation()
            futures = [
                self.submit_evaluation(run.folder.path, run.folder.key, run.recipe.label)
                for run in runs
            ]
            evaluated = [
                replace(run, evaluation=f.result()) for run, f in zip(runs, futures, strict=True)
            ]
            return evaluated, dense_future.result()


def run_metrics(run: VariantRun, dense: Evaluation | None) -> dict[str, float]:
    """MLflow metrics of an evaluated variant: quality against the dense model, size, speed, the
    seconds its stages took, and what healing did."""
    import math

    from tasks.evaluate import metrics

    if run.evaluation is None:
        raise FFSplitError(f"{run.recipe.label}: not evaluated yet")
    out = metrics(run.evaluation.record, None if dense is None else dense.record)
    out["compress_seconds"] = run.compress_seconds
    if run.stats is not None:
        out["profile_seconds"] = run.stats.profile_seconds
    heal = run.folder.heal if run.unhealed is not None else None
    names = {"seconds": "heal_seconds", "before": "heal_loss_before", "after": "heal_loss_after"}
    for key, metric in names.items():
        value = (heal or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[metric] = float(value)
    return out
