"""Heal stage: a short distillation of an assembled variant's compressed FFNs against the dense model.

Healing needs the whole model (the dense teacher and every compressed FFN), so it runs after
assembly as one Ray task per variant (ffsplit.jobs.heal_job, the library's own job). Shards and the
assembled folder are made by the recipe without its heal config (Recipe.unhealed), so one
compression serves any number of heal settings; the healed folder is keyed by the assembled
variant's key and the heal config (tasks/cache.py), written atomically, and a finished one is a
cache hit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ffsplit.config import HealConfig
from tasks import cache
from tasks.assemble import finished_variant
from tasks.records import BaseModel, VariantFolder, read_variant
from tasks.runtime import (
    base_model,
    node_cpus,
    release_worker_caches,
    set_task_threads,
    task_device,
    task_resources,
)
from tasks.stage import stage


def healed_path(cache_dir: str, variant: VariantFolder, heal: HealConfig) -> str:
    """Where the healed copy of an assembled variant lives in the cache."""
    return str(cache.healed_dir(Path(cache_dir), cache.heal_key(variant.key, heal.to_dict())))


@stage("heal", done=finished_variant, resources=lambda **_: task_resources(cpus=node_cpus()))
def heal_variant(
    *, model: BaseModel, variant: str, heal: dict[str, Any], out: str
) -> VariantFolder:
    """Assembled variant folder + base model -> healed variant folder (heal_job; atomic)."""
    from ffsplit.jobs import heal_job

    started = time.perf_counter()
    release_worker_caches()  # statistics and models of other stages: healing needs the memory
    set_task_threads()
    device = task_device()
    dense, _, _ = base_model(model.name, model.sha256, device)  # read only: the teacher
    heal_job(
        variant,
        HealConfig.from_dict(heal, where="heal"),
        out,
        dense=(dense, model.sha256),
        device=device,
    )
    return read_variant(out, cached=False, seconds=time.perf_counter() - started)
