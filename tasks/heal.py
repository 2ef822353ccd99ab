"""Heal stage: a short distillation of an assembled variant's compressed FFNs against the dense model.

Healing needs the whole model (the dense teacher and every compressed FFN), so it runs after
assembly as one Ray task per variant (ffsplit.jobs.heal_job, the library's own job). Shards and the
assembled folder are made by the recipe without its heal config, so one compression serves any
number of heal settings; the healed folder is keyed by the assembled variant's key and the heal
config (tasks/cache.py), written atomically, and a finished one is a cache hit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ffsplit.config import HealConfig, Recipe
from tasks.assemble import variant_summary
from tasks.runtime import (
    base_model,
    node_cpus,
    prefect_task,
    release_worker_caches,
    run_remote,
    set_task_threads,
    task_device,
    task_resources,
)


def unhealed(recipe: Recipe) -> Recipe:
    """The recipe the compress and assemble stages run: the same without healing."""
    return recipe.replace(heal=HealConfig())


def heal_variant_job(
    model: str, model_sha256: str, variant: str, heal: dict[str, Any], out: str
) -> dict[str, Any]:
    """Ray task body: assembled variant folder + base model -> healed variant folder (atomic)."""
    from ffsplit.jobs import heal_job
    from ffsplit.variant.manifest import MANIFEST

    target = Path(out)
    if (target / MANIFEST).is_file():
        return {**variant_summary(target), "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    release_worker_caches()  # statistics and models of other stages: healing needs the memory
    threads = set_task_threads()
    device = task_device()
    dense, _, _ = base_model(model, model_sha256, device)  # read only: the teacher
    heal_job(
        variant,
        HealConfig.from_dict(heal, where="heal"),
        target,
        dense=(dense, model_sha256),
        device=device,
    )
    return {
        **variant_summary(target),
        "cached": False,
        "threads": threads,
        "seconds": time.perf_counter() - started,
    }


def run_heal(
    model: str, model_sha256: str, variant: str, heal: dict[str, Any], out: str
) -> dict[str, Any]:
    """Heal on Ray with a node's CPUs (a GPU when the cluster has one); a finished folder returns
    at once without touching Ray."""
    from ffsplit.variant.manifest import MANIFEST

    if (Path(out) / MANIFEST).is_file():
        return {**variant_summary(out), "cached": True, "seconds": 0.0}
    return run_remote(
        heal_variant_job,
        model,
        model_sha256,
        variant,
        heal,
        out,
        resources=task_resources(cpus=node_cpus()),
    )


@prefect_task(name="heal")
def heal_variant(
    model: str, model_sha256: str, variant: str, heal: dict[str, Any], out: str
) -> dict[str, Any]:
    """Prefect task: the healed variant folder of an assembled variant (cached by content)."""
    return run_heal(model, model_sha256, variant, heal, out)
