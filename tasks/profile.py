"""Profile stage: per-neuron statistics of a base model, one file per calibration unit.

The calibration windows are cut into a fixed number of units (windows u, u+U, u+2U, ...; U is a
run parameter, never the worker count), and each unit's statistics go to their own file, so the
merged statistics are the same whatever number of workers ran the units (aggregate folds them in
unit order). Two modes:
- "units": one Ray task per unit holds the whole model;
- "layer_groups": for a model too large for one worker, each unit is a chain of Ray tasks, each
  holding consecutive decoder layers (ffsplit.profiling.sequential) and handing the hidden states
  on through a file; the unit's statistics equal those of the "units" mode.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from tasks import cache
from tasks.records import BaseModel, UnitStats
from tasks.runtime import (
    base_model,
    check_model_sha,
    node_cpus,
    run_remote,
    set_task_threads,
    task_device,
    task_resources,
)
from tasks.stage import stage

MODES = ("units", "layer_groups")


def unit_windows(tokenizer: Any, config: ProfileConfig, unit: int, units: int) -> tuple[Any, dict]:
    """Calibration windows of one unit and their record (corpus, split, hash, unit)."""
    from ffsplit.jobs import calibration_data

    windows, info = calibration_data(tokenizer, config, shard=(unit, units))
    if windows.shape[0] == 0:
        raise FFSplitError(
            f"calibration unit {unit} of {units} holds no windows ({config.tokens} tokens make "
            f"{config.tokens // config.window} windows of {config.window}); use fewer profile units"
        )
    info["unit"] = [unit, units]
    return windows, info


def _weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def check_memory_cap(bytes_held: int, cap_mb: float | None, what: str) -> None:
    """Refuse to hold more model weights in one worker than the cap (the layer-group contract)."""
    if cap_mb is not None and bytes_held > cap_mb * 2**20:
        raise FFSplitError(
            f"{what} holds {bytes_held / 2**20:.1f} MB of weights, over the worker memory cap of "
            f"{cap_mb:.1f} MB: profile by layer groups (profile_mode='layer_groups') with fewer "
            "layers per group"
        )


def unit_resources(units: int, **_: Any) -> dict[str, Any]:
    """Ray options of one profile unit: a GPU each where there are GPUs, else a fair share of a
    node's CPUs (one unit on a 2-core machine runs 2 threads: no second model load, no merge)."""
    return task_resources(cpus=max(1, node_cpus() // max(1, units)))


def finished_unit(unit: int, out: str, **_: Any) -> UnitStats | None:
    """The record of a unit's statistics file already written, else None."""
    return UnitStats(path=out, unit=unit, cached=True) if Path(out).is_file() else None


@stage(
    "profile-unit",
    done=finished_unit,
    resources=unit_resources,
    task_run_name="profile-unit-{unit}",
)
def profile_unit(
    *,
    model: BaseModel,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    memory_cap_mb: float | None = None,
) -> UnitStats:
    """Statistics of one calibration unit with the whole model in this worker."""
    from ffsplit.profiling import profile_model, save_stats

    started = time.perf_counter()
    threads = set_task_threads()
    device = task_device()
    config = ProfileConfig.from_dict(profile)
    net, tokenizer, ref = base_model(model.name, model.sha256, device)
    check_memory_cap(_weights_bytes(net), memory_cap_mb, f"model {model.name!r}")
    if tokenizer is None:
        raise FFSplitError(
            f"model {model.name!r} has no tokenizer files; cannot cut calibration text"
        )
    windows, calibration = unit_windows(tokenizer, config, unit, units)
    meta = {"model_sha256": ref.weights_sha256, "calibration": calibration, "unit": [unit, units]}
    stats = profile_model(net, windows, config, meta=meta)
    save_stats(stats, out)
    return UnitStats(
        path=out,
        unit=unit,
        cached=False,
        seconds=time.perf_counter() - started,
        tokens=int(windows.numel()),
        device=device,
        threads=threads,
    )


def capture_job(
    model: str, model_sha256: str, profile: dict[str, Any], unit: int, units: int, out: str
) -> dict[str, Any]:
    """Ray task body: the hidden states entering layer 0 for one unit (embedding stage only)."""
    from ffsplit.models.registry import resolve_model
    from ffsplit.profiling.sequential import (
        capture_layer_inputs,
        load_embedding_stage,
        save_layer_inputs,
    )

    started = time.perf_counter()
    set_task_threads()
    device = task_device()
    config = ProfileConfig.from_dict(profile)
    ref = resolve_model(model)
    check_model_sha(model, ref.weights_sha256, model_sha256)
    tokenizer = _tokenizer(ref.path)
    windows, calibration = unit_windows(tokenizer, config, unit, units)
    stage = load_embedding_stage(ref.path, device=device)
    inputs = capture_layer_inputs(stage, windows, batch_size=config.batch_size)
    save_layer_inputs(inputs, out)
    return {
        "path": out,
        "calibration": calibration,
        "tokens": int(windows.numel()),
        "seconds": time.perf_counter() - started,
    }


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise FFSplitError(f"model folder {folder}: no usable tokenizer ({exc})") from None


def layer_group_job(
    model: str,
    profile: dict[str, Any],
    first: int,
    last: int,
    inputs_path: str,
    stats_out: str,
    next_inputs_out: str | None,
    memory_cap_mb: float | None = None,
) -> dict[str, Any]:
    """Ray task body: statistics of layers first..last and the hidden states entering last+1."""
    from ffsplit.models.registry import resolve_model
    from ffsplit.profiling import save_stats
    from ffsplit.profiling.sequential import (
        load_layer_group,
        load_layer_inputs,
        run_layer_group,
        save_layer_inputs,
    )

    started = time.perf_counter()
    set_task_threads()
    device = task_device()
    config = ProfileConfig.from_dict(profile)
    net = load_layer_group(resolve_model(model).path, first, last, device=device)
    held = _weights_bytes(net)
    check_memory_cap(held, memory_cap_mb, f"layer group {first}..{last} of {model!r}")
    inputs = load_layer_inputs(inputs_path, device=device)
    stats, after = run_layer_group(net, first, last, inputs, config)
    save_stats(stats, stats_out)
    if next_inputs_out is not None:
        save_layer_inputs(after, next_inputs_out)
    return {
        "first": first,
        "last": last,
        "weights_mb": held / 2**20,
        "seconds": time.perf_counter() - started,
    }


def join_groups_job(group_paths: list[str], meta: dict[str, Any], out: str) -> dict[str, Any]:
    """Ray task body: one unit's statistics from those of its layer groups."""
    from ffsplit.profiling import load_stats, save_stats
    from ffsplit.profiling.sequential import join_layer_groups

    joined = join_layer_groups([load_stats(p) for p in group_paths])
    joined.meta.update(meta)
    save_stats(joined, out)
    return {"path": out, "tokens": joined.tokens}


@stage(
    "profile-unit",
    done=finished_unit,
    # The chain's own task only waits on its steps (each asks for its own resources).
    resources=lambda **_: {"num_cpus": 0, "num_gpus": 0},
    task_run_name="profile-unit-{unit}",
)
def profile_unit_by_layer_groups(
    *,
    model: BaseModel,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    group_size: int,
    memory_cap_mb: float | None = None,
) -> UnitStats:
    """One unit as a chain of Ray tasks (capture, then each layer group in order), then a join.

    Hand-off files live in a work folder beside `out` and are removed once the unit is done.
    """
    from ffsplit.profiling.sequential import count_layers, layer_groups

    model_sha256 = model.sha256
    target = Path(out)
    started = time.perf_counter()
    groups = layer_groups(count_layers(model.name), group_size)
    work = target.with_name(f".{target.stem}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    resources = task_resources(cpus=1)
    if memory_cap_mb is not None:  # ask Ray for a node with that much memory free per group task
        resources["memory"] = int(memory_cap_mb * 2**20)
    try:
        inputs = str(work / f"inputs-{groups[0][0]}.safetensors")
        captured = run_remote(
            capture_job, model.name, model_sha256, profile, unit, units, inputs, resources=resources
        )
        parts = []
        steps = []
        for i, (first, last) in enumerate(groups):
            stats_out = str(work / f"stats-{first}-{last}.safetensors")
            next_inputs = (
                str(work / f"inputs-{last + 1}.safetensors") if i + 1 < len(groups) else None
            )
            steps.append(
                run_remote(
                    layer_group_job,
                    model.name,
                    profile,
                    first,
                    last,
                    inputs,
                    stats_out,
                    next_inputs,
                    memory_cap_mb,
                    resources=resources,
                )
            )
            parts.append(stats_out)
            if next_inputs is not None:
                Path(inputs).unlink(missing_ok=True)
                inputs = next_inputs
        meta = {
            "model_sha256": model_sha256,
            "calibration": {**captured["calibration"]},
            "unit": [unit, units],
        }
        run_remote(join_groups_job, parts, meta, out, resources=resources)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return UnitStats(
        path=out,
        unit=unit,
        cached=False,
        seconds=time.perf_counter() - started,
        tokens=captured["tokens"],
        groups=tuple((s["first"], s["last"]) for s in steps),
        max_group_weights_mb=max(s["weights_mb"] for s in steps),
    )


def unit_paths(
    cache_dir: str,
    model: BaseModel,
    profile: ProfileConfig,
    units: int,
    mode: str = "units",
    group_size: int | None = None,
) -> list[str]:
    """Where each unit's statistics live in the cache (what the fan-out writes and checks)."""
    if mode not in MODES:
        raise FFSplitError(f"profile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    root = Path(cache_dir)
    groups = group_size if mode == "layer_groups" else None
    keys = [
        cache.unit_stats_key(model.sha256, profile.to_dict(), unit, units, mode, groups)
        for unit in range(units)
    ]
    return [str(cache.unit_stats_path(root, key)) for key in keys]


def unit_stage(mode: str) -> Any:
    """The stage that profiles one unit in this mode (whole model, or layer groups)."""
    if mode not in MODES:
        raise FFSplitError(f"profile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    return profile_unit if mode == "units" else profile_unit_by_layer_groups
