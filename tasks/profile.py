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
from tasks.runtime import (
    base_model,
    check_model_sha,
    node_cpus,
    prefect_task,
    run_remote,
    set_task_threads,
    submit,
    task_device,
    task_resources,
    wait,
)

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


def profile_unit_job(
    model: str,
    model_sha256: str,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    memory_cap_mb: float | None = None,
) -> dict[str, Any]:
    """Ray task body: statistics of one calibration unit with the whole model in this worker."""
    from ffsplit.profiling import profile_model, save_stats

    target = Path(out)
    if target.is_file():
        return {"unit": unit, "path": out, "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    threads = set_task_threads()
    device = task_device()
    config = ProfileConfig.from_dict(profile)
    net, tokenizer, ref = base_model(model, model_sha256, device)
    check_memory_cap(_weights_bytes(net), memory_cap_mb, f"model {model!r}")
    if tokenizer is None:
        raise FFSplitError(f"model {model!r} has no tokenizer files; cannot cut calibration text")
    windows, calibration = unit_windows(tokenizer, config, unit, units)
    meta = {"model_sha256": ref.weights_sha256, "calibration": calibration, "unit": [unit, units]}
    stats = profile_model(net, windows, config, meta=meta)
    save_stats(stats, target)
    return {
        "unit": unit,
        "path": out,
        "cached": False,
        "tokens": int(windows.numel()),
        "seconds": time.perf_counter() - started,
        "device": device,
        "threads": threads,
    }


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


def profile_unit_by_layer_groups(
    model: str,
    model_sha256: str,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    group_size: int,
    memory_cap_mb: float | None = None,
) -> dict[str, Any]:
    """One unit as a chain of Ray tasks (capture, then each layer group in order), then a join.

    Hand-off files live in a work folder beside `out` and are removed once the unit is done.
    """
    from ffsplit.profiling.sequential import count_layers, layer_groups

    target = Path(out)
    if target.is_file():
        return {"unit": unit, "path": out, "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    groups = layer_groups(count_layers(model), group_size)
    work = target.with_name(f".{target.stem}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    resources = task_resources(cpus=1)
    if memory_cap_mb is not None:  # ask Ray for a node with that much memory free per group task
        resources["memory"] = int(memory_cap_mb * 2**20)
    try:
        inputs = str(work / f"inputs-{groups[0][0]}.safetensors")
        captured = run_remote(
            capture_job, model, model_sha256, profile, unit, units, inputs, resources=resources
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
                    model,
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
    return {
        "unit": unit,
        "path": out,
        "cached": False,
        "tokens": captured["tokens"],
        "seconds": time.perf_counter() - started,
        "groups": [[s["first"], s["last"]] for s in steps],
        "max_group_weights_mb": max(s["weights_mb"] for s in steps),
    }


def unit_plan(
    model_sha256: str,
    profile: dict[str, Any],
    units: int,
    cache_dir: str,
    mode: str = "units",
    group_size: int | None = None,
) -> list[dict[str, Any]]:
    """Key and output path of every unit (what the fan-out submits, and the cache it checks)."""
    if mode not in MODES:
        raise FFSplitError(f"profile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    root = Path(cache_dir)
    plan = []
    for unit in range(units):
        key = cache.unit_stats_key(
            model_sha256, profile, unit, units, mode, group_size if mode == "layer_groups" else None
        )
        plan.append({"unit": unit, "key": key, "path": str(cache.unit_stats_path(root, key))})
    return plan


def unit_resources(units: int) -> dict[str, Any]:
    """Ray options of one profile unit: a GPU each where there are GPUs, else a fair share of a
    node's CPUs (one unit on a 2-core machine runs 2 threads: no second model load, no merge)."""
    return task_resources(cpus=max(1, node_cpus() // max(1, units)))


def run_unit(
    model: str,
    model_sha256: str,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    mode: str = "units",
    group_size: int | None = None,
    memory_cap_mb: float | None = None,
) -> dict[str, Any]:
    """Statistics of one unit on Ray (a cache hit returns at once without touching Ray)."""
    if Path(out).is_file():
        return {"unit": unit, "path": out, "cached": True, "seconds": 0.0}
    if mode == "layer_groups":
        if group_size is None:
            raise FFSplitError("profile_mode 'layer_groups' needs layer_group_size")
        return profile_unit_by_layer_groups(
            model, model_sha256, profile, unit, units, out, group_size, memory_cap_mb
        )
    return run_remote(
        profile_unit_job,
        model,
        model_sha256,
        profile,
        unit,
        units,
        out,
        memory_cap_mb,
        resources=unit_resources(units),
    )


def run_units(
    model: str,
    model_sha256: str,
    profile: dict[str, Any],
    plan: list[dict[str, Any]],
    memory_cap_mb: float | None = None,
) -> list[dict[str, Any]]:
    """All units of the 'units' mode as parallel Ray tasks (for callers outside a Prefect flow)."""
    units = len(plan)
    refs = [
        None
        if Path(p["path"]).is_file()
        else submit(
            profile_unit_job,
            model,
            model_sha256,
            profile,
            p["unit"],
            units,
            p["path"],
            memory_cap_mb,
            resources=unit_resources(units),
        )
        for p in plan
    ]
    done = iter(wait([r for r in refs if r is not None]))
    return [
        {"unit": p["unit"], "path": p["path"], "cached": True, "seconds": 0.0}
        if r is None
        else next(done)
        for p, r in zip(plan, refs, strict=True)
    ]


@prefect_task(name="profile-unit", task_run_name="profile-unit-{unit}")
def profile_unit(
    model: str,
    model_sha256: str,
    profile: dict[str, Any],
    unit: int,
    units: int,
    out: str,
    mode: str = "units",
    group_size: int | None = None,
    memory_cap_mb: float | None = None,
) -> dict[str, Any]:
    """Prefect task: one calibration unit's statistics file, computed on Ray (cached by content)."""
    return run_unit(model, model_sha256, profile, unit, units, out, mode, group_size, memory_cap_mb)
