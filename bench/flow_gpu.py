"""The real pipeline on the GPU machine in one device call (issue 15; bench/gpu_flow.sh runs it).

A user's `compress` flow (flows.compress.compress, registering), against local Prefect and MLflow
servers (services.stack, SQLite, 127.0.0.1), with Ray tasks that hold the GPU, on
(a) a 7B-config model: Llama-2-7B's shapes, seeded random bf16 weights built on the GPU and saved
    as an HF folder with SmolLM2's carried tokenizer (bench.multigpu.build_model_folder);
(b) the real packaged model carried in the FFSPLIT_CACHE layout (minilm-l6).
Recipe: heavy neurons by score kept bf16, light neurons int4 (group 64) at the budget where every
light neuron is int4; profile.collect_grams false (a 7B model's Grams are ~35 GB per unit).
For each model, in this order: the library's jobs doing the same job without Ray and Prefect
(ffsplit.jobs profile_job, compress_job, evaluate_job of the variant and of the dense model, on the
GPU), the flow on an empty cache (timed: the pipeline overhead), the flow again on the warm cache
(what orchestration alone costs), and a registry pull in a fresh process (`pull`): the model
version loaded by `models:/NAME@ALIAS` gives the same logits as load_variant of the flow's folder.
With 2 GPUs, bench.multigpu.run_benchmark compares 1 and 2 GPUs in the same call.

Subcommands (all write JSON):
  status   which carried parts are here (size and sha256 checked): the calls that only carry
  install  join the parts, check them, extract wheels and assets, check the image's versions
           against the carried packages' pins (fallback wheels for misses), pip install --target
  run      the benchmark (the install's site folder on PYTHONPATH); writes --json as it goes
  pull     the fresh process of the registry pull (run starts it)

The 7B-config model's layer count is --llama-layers (32 is all of Llama-2-7B); see the README of
the device-call plan in cluster/README.md for the value that fits a call.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Set for the services, the flow and every Ray worker (docs/stack-notes.md), before any import:
# the workers' own environment (tasks.runtime.WORKER_ENV: offline, no telemetry) and these.
RUN_ENV = {
    "FFSPLIT_NO_INSTALL": "1",  # the carried cache must hold everything: never fetch
    "PREFECT_UI_ENABLED": "false",  # the UI was trimmed from the carried wheel
    # The machine's memory grows as it is first used (KINDS.md): Ray's monitor would read a small
    # total and kill 7B workers.
    "RAY_memory_monitor_refresh_ms": "0",
}
ALIAS = "h200"
PYTHON = (3, 12)


def sha256_file(path: Path) -> str:
    """(The standard library's, not ffsplit.files': status and install run before the stack is.)"""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------ the carry


def carry_status(carry: Path) -> dict[str, Any]:
    """The parts of the carried stream that are here, each checked by size and sha256."""
    manifests = sorted(carry.glob("part-*/manifest.json"))
    if not manifests:
        return {"ready": False, "error": f"no {carry}/part-*/manifest.json here", "parts": []}
    loaded = [json.loads(p.read_text()) for p in manifests]
    streams = {m["stream_sha256"] for m in loaded}
    manifest = loaded[-1]
    parts = []
    for part in manifest["parts"]:
        path = carry / part["folder"] / part["file"]
        here = path.is_file() and path.stat().st_size == part["bytes"]
        good = here and sha256_file(path) == part["sha256"]
        parts.append({**part, "here": here, "sha256_ok": good})
    image = check_pins(manifest.get("image_pins") or {}, [])
    return {
        "ready": len(streams) == 1 and all(p["sha256_ok"] for p in parts),
        "image_misses": {n: r for n, r in image.items() if r["misses"]},
        "builds_seen": len(streams),  # parts of two builds: carry them all again
        "stream_sha256": manifest["stream_sha256"],
        "packed_mib": manifest.get("packed_mib"),
        "parts": parts,
        "manifest": manifest,
    }


class _Joined(io.RawIOBase):
    """The parts read back to back as one stream, hashed as they are read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self.digest = hashlib.sha256()
        self._file: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._file is None:
                if not self.paths:
                    return 0
                self._file = open(self.paths.pop(0), "rb")
            n = self._file.readinto(buffer)
            if n:
                self.digest.update(memoryview(buffer)[:n])
                return n
            self._file.close()
            self._file = None


def _distributions(paths: list[str]) -> list[Any]:
    from importlib.metadata import distributions

    return list(distributions(path=paths)) if paths else list(distributions())


def check_pins(pins: dict[str, list[list[str]]], paths: list[str]) -> dict[str, Any]:
    """Each pinned package's version in `paths` (the image: sys.path) against every pin on it."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    versions: dict[str, str] = {}
    for dist in _distributions(paths):  # the first on the path is the one imported
        versions.setdefault(canonicalize_name(dist.metadata["Name"] or ""), dist.version)
    out: dict[str, Any] = {}
    for name, required in pins.items():
        version = versions.get(name)
        misses = [
            [who, spec]
            for who, spec in required
            if version is None or not SpecifierSet(spec).contains(version, prereleases=True)
        ]
        out[name] = {"version": version, "misses": misses}
    return out


def install(carry: Path, work: Path, site: Path) -> dict[str, Any]:
    """Join and check the parts, extract them, pip install the wheels (and the fallbacks the
    image needs) into site; returns what it did (also work/install.json)."""
    started = time.perf_counter()
    status = carry_status(carry)
    if not status["ready"]:
        missing = [p["folder"] for p in status["parts"] if not p["sha256_ok"]]
        raise SystemExit(f"carry not complete: parts missing or damaged {missing}")
    manifest = status.pop("manifest")
    marker = site / ".ffsplit-carry"
    done = work / "install.json"
    if marker.is_file() and marker.read_text() == manifest["stream_sha256"] and done.is_file():
        record = json.loads(done.read_text())  # an earlier call on this machine installed it
        record["reused"] = True
        return record
    payload = work / "payload"
    shutil.rmtree(payload, ignore_errors=True)
    payload.mkdir(parents=True)
    joined = _Joined([carry / p["folder"] / p["file"] for p in manifest["parts"]])
    with lzma.open(joined) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(payload, filter="data")
    if joined.digest.hexdigest() != manifest["stream_sha256"]:
        raise SystemExit("carried stream sha256 differs from the manifest")
    extracted = time.perf_counter()
    bad = [f for f, h in manifest["files"].items() if sha256_file(payload / f) != h]
    if bad:
        raise SystemExit(f"extracted files differ from the manifest: {bad[:5]}")
    checked = time.perf_counter()
    image = check_pins(manifest["image_pins"], [])
    from packaging.utils import canonicalize_name

    fallback = {canonicalize_name(w.split("-")[0]): w for w in manifest["fallback"]}
    needed = sorted({n for n, r in image.items() if r["misses"] and n in fallback})
    wheels = sorted((payload / "wheels").glob("*.whl"))
    wheels += [payload / "fallback" / fallback[n] for n in needed]
    shutil.rmtree(site, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target"]
    command += [str(site)]
    if sys.version_info[:2] != PYTHON:  # a check on another Python: install for 3.12 anyway
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
        from build_gpu_wheels import target_args

        command += target_args()
    pip = subprocess.run(command + [str(w) for w in wheels], capture_output=True, text=True)
    if pip.returncode != 0:
        raise SystemExit(f"pip install failed:\n{(pip.stdout + pip.stderr)[-3000:]}")
    installed = time.perf_counter()
    after = check_pins(manifest["image_pins"], [str(site), *sys.path[1:]])
    record = {
        "python": sys.version.split()[0],
        "carry": {k: v for k, v in status.items() if k != "parts"},
        "parts": [{k: p[k] for k in ("folder", "bytes", "sha256_ok")} for p in status["parts"]],
        "wheels": len(wheels),
        "fallbacks_installed": needed,
        "image_versions": {n: r["version"] for n, r in image.items()},
        "image_misses": {n: r["misses"] for n, r in image.items() if r["misses"]},
        "misses_left": {n: r["misses"] for n, r in after.items() if r["misses"]},
        "payload": str(payload),
        "site": str(site),
        "assets": manifest.get("assets"),
        "seconds": {
            "extract": extracted - started,
            "check_files": checked - extracted,
            "pip_install": installed - checked,
            "total": installed - started,
        },
    }
    write_json(done, record)
    marker.write_text(manifest["stream_sha256"])
    return record


# ------------------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    from importlib.metadata import PackageNotFoundError, version

    # By metadata, not import: Prefect read before the servers are up would keep no API URL and
    # run the flow against a temporary server of its own.
    for name in ("transformers", "ray", "prefect", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            info[name] = version(name)
    return info


def ffn_shape(model_dir: Path) -> Any:
    """The FFN shape of a model folder, from its config alone (the model built on meta)."""
    from transformers import AutoConfig

    from ffsplit.adapters import get_adapter
    from ffsplit.compress.budget import FFNShape
    from ffsplit.models.loading import empty_model

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    model = empty_model(config, str(model_dir))
    adapter = get_adapter(model)
    return FFNShape.from_weights(adapter.weights(model, adapter.ffns(model)[0]))


def recipe_for(model_dir: Path, calib_tokens: int, window: int) -> dict[str, Any]:
    """bench.multigpu's recipe (heavy bf16, light int4) at this model's all-int4 budget."""
    from bench.multigpu import all_int4_budget, default_recipe

    recipe = default_recipe()
    group = recipe["quant"]["group_size"]
    recipe["ffn_reduction"] = all_int4_budget(ffn_shape(model_dir), recipe["heavy_ratio"], group)
    recipe["profile"] = {"tokens": calib_tokens, "window": window, "collect_grams": False}
    return recipe


def free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def library_job(
    model: str, recipe: dict[str, Any], work: Path, device: str, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """The same job by the library alone, on `device`: profile_job, compress_job (those
    statistics), evaluate_job of the variant (latency raced against dense) and of the dense model."""
    from ffsplit.config import Recipe
    from ffsplit.jobs import compress_job, evaluate_job, profile_job

    parsed = Recipe.from_dict(recipe)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stages: dict[str, float] = {}
    started = time.perf_counter()
    try:
        t = started
        profiled = profile_job(model, parsed.profile, work / "stats.safetensors", device=device)
        stages["profile"] = time.perf_counter() - t
        t = time.perf_counter()
        compressed = compress_job(
            model, parsed, work / "variant", stats_path=work / "stats.safetensors", device=device
        )
        stages["compress"] = time.perf_counter() - t
        t = time.perf_counter()
        variant = evaluate_job(work / "variant", latency=True, device=device, **evaluation)
        stages["evaluate_variant"] = time.perf_counter() - t
        free_gpu()
        t = time.perf_counter()
        dense = evaluate_job(model, latency=False, device=device, **evaluation)
        stages["evaluate_dense"] = time.perf_counter() - t
    except Exception as exc:  # the stages that finished go with the traceback into the JSON
        done = {k: round(v, 2) for k, v in stages.items()}
        exc.add_note(f"library job: stages done before the failure (s): {done}")
        raise
    seconds = time.perf_counter() - started
    free_gpu()
    quality = "perplexity" if "perplexity" in variant else "accuracy"
    return {
        "seconds": seconds,
        "stages": stages,
        "device": device,
        quality: variant.get(quality),
        f"dense_{quality}": dense.get(quality),
        "ffn_reduction": compressed["ffn_reduction"],
        "profile_in_job_s": profiled["profile_seconds"],
        "latency": variant.get("latency"),
        "variant": str(work / "variant"),
    }


def task_runs(flow_run_id: str) -> dict[str, Any]:
    """The flow run and its task runs as the Prefect server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    return {
        "flow_run": {
            "id": str(run.id),
            "name": run.name,
            "state": run.state_name,
            "seconds": run.total_run_time.total_seconds(),
        },
        "task_runs": sorted(
            (
                {
                    "name": t.name,
                    "state": t.state_name,
                    "seconds": round(t.total_run_time.total_seconds(), 3),
                    "start": str(t.start_time),
                }
                for t in tasks
            ),
            key=lambda t: t["start"],
        ),
    }


def stage_devices(cache_dir: Path, holders: dict[str, Any], cluster: dict[str, Any]) -> dict:
    """Where each stage ran, from what the stages left (shard metadata, evaluation records) and
    from the GPU sampler (which Ray task processes held GPU memory)."""
    from ffsplit.variant.shards import read_shard_spec

    def seen(task: str) -> list[str]:
        return sorted(
            f"{key.split(':', 1)[0]} {v['max_mib']:.0f} MiB"
            for key, v in holders.items()
            if key.split(":", 1)[1].startswith(f"ray::{task}")
        )

    shards = [s for s in sorted((cache_dir / "shards").glob("*")) if (s / "shard.json").is_file()]
    evals = [json.loads(p.read_text()) for p in sorted((cache_dir / "evals").glob("*.json"))]
    eval_devices = sorted(
        {(r.get("latency") or {}).get("workload", {}).get("device") for r in evals} - {None}
    )
    gpu = cluster.get("gpus", 0) > 0
    return {
        "profile": {"requests_gpu": gpu, "gpu_memory_seen": seen("profile_unit")},
        "aggregate": {"requests_gpu": False, "gpu_memory_seen": seen("aggregate")},
        "compress": {
            "requests_gpu": gpu,
            "shard_devices": sorted(
                {(read_shard_spec(s).get("meta") or {}).get("device") for s in shards} - {None}
            ),
            "gpu_memory_seen": seen("compress_shard"),
        },
        "assemble": {"requests_gpu": False, "gpu_memory_seen": seen("assemble")},
        "evaluate": {
            "requests_gpu": gpu,
            "latency_devices": eval_devices,
            "gpu_memory_seen": seen("evaluate"),
        },
        "register": {"where": "the flow's process (MLflow client)"},
    }


@dataclass(frozen=True)
class FlowCall:
    """What the compress flow is called with for one model, cold and warm alike."""

    model: str
    recipe: dict[str, Any]
    evaluation: dict[str, Any]  # evaluate_job's keywords: max_tokens, window, latency_workload
    flow_params: dict[str, Any]  # how work is cut: profile units, compress shards
    register_as: str


def flow_job(call: FlowCall, work: Path, cold: bool) -> dict[str, Any]:
    """The compress flow as a user runs it (cache in work/cache). cold: the cache emptied first
    and the variant registered; warm: the cache kept (every stage a hit), nothing registered."""
    from prefect.settings import PREFECT_API_URL

    from bench.multigpu import GpuSampler
    from flows.compress import compress

    if PREFECT_API_URL.value() != os.environ.get("PREFECT_API_URL"):
        raise RuntimeError(
            f"Prefect would use {PREFECT_API_URL.value()!r}, not the server started here "
            f"({os.environ.get('PREFECT_API_URL')!r}): it was imported before the server was up"
        )
    cache_dir = work / "cache"
    if cold:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    latency = call.evaluation["latency_workload"]
    started = time.perf_counter()
    with GpuSampler() as sampler:
        state = compress(
            model=call.model,
            recipe=call.recipe,
            eval_tokens=call.evaluation["max_tokens"],
            eval_window=call.evaluation["window"],
            latency=True,
            latency_prompt_tokens=latency["prompt_tokens"],
            latency_decode_tokens=latency["decode_tokens"],
            latency_repeats=latency["repeats"],
            register_as=call.register_as,
            register_model=cold,
            run_dir=str(work / f"run-{'cold' if cold else 'warm'}"),
            cache_dir=str(cache_dir),
            return_state=True,
            **call.flow_params,
        )
    wall = time.perf_counter() - started
    summary = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    out = {
        "flow_run_id": flow_run_id,
        "state": state.name,
        "wall_s": wall,
        "flow_s": summary["seconds"],
        "stage_seconds": summary["stage_seconds"],
        "cluster": summary["cluster"],
        "cached": summary["cached"],
        "metrics": summary["metrics"],
        "dense": summary["dense"],
        "registered": summary.get("registered"),
        "variant": summary["variant"],
        "gpu_sampler": sampler.report(),
    }
    out["stage_devices"] = stage_devices(cache_dir, sampler.holders, summary["cluster"])
    try:  # the server's record of the run
        out.update(task_runs(flow_run_id))
    except Exception as exc:
        out["task_runs_error"] = f"{type(exc).__name__}: {exc}"
    return out


def registry_record(registered: dict[str, Any]) -> dict[str, Any]:
    """The model version with its metrics as MLflow holds them; the alias set on it."""
    from mlflow import MlflowClient

    from tracking.registry import set_alias

    set_alias(registered["name"], ALIAS, registered["version"])
    client = MlflowClient()
    version = client.get_model_version_by_alias(registered["name"], ALIAS)
    run = client.get_run(version.run_id)
    return {
        "name": version.name,
        "version": version.version,
        "alias": ALIAS,
        "status": version.status,
        "tags": dict(version.tags),
        "run_id": version.run_id,
        "metrics": dict(run.data.metrics),
        "uri": f"models:/{version.name}@{ALIAS}",
    }


def pull_in_fresh_process(uri: str, variant: str, out: Path, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "pull", "--uri", uri]
        + ["--variant", variant, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    record = json.loads(out.read_text()) if out.is_file() else {}
    record["process_s"] = time.perf_counter() - started
    record["exit"] = done.returncode
    if done.returncode != 0:
        record["stderr_tail"] = done.stderr[-2000:]
    return record


def pull(uri: str, variant: str, out: Path) -> dict[str, Any]:
    """(A fresh process.) The registered model by its URI, against load_variant of the folder the
    flow made: the pyfunc's own outputs on the CPU (as served), then both models on the GPU."""
    import mlflow
    import pandas as pd
    import torch

    from ffsplit.variant import load_variant

    record: dict[str, Any] = {"uri": uri, "variant": variant, "pid": os.getpid()}
    started = time.perf_counter()
    served_model = mlflow.pyfunc.load_model(uri)
    record["load_s"] = time.perf_counter() - started
    served = served_model.unwrap_python_model()
    text = "The heavy hitters of a feed-forward layer carry most of its output."
    ids = served.token_ids(pd.DataFrame({"text": [text]}))
    record["tokens"] = len(ids[0])
    reference, _, _ = load_variant(variant, device="cpu")
    batch = torch.tensor(ids, dtype=torch.long)

    def output(model: Any, device: str) -> Any:
        with torch.inference_mode():
            result = model(input_ids=batch.to(device))
        tensor = result.logits if hasattr(result, "logits") else result.last_hidden_state
        return tensor[0].float().cpu()

    served_cpu = served.logits(pd.DataFrame({"input_ids": ids}))[0]
    ref_cpu = output(reference, "cpu")
    record["cpu_equal"] = bool(torch.equal(served_cpu, ref_cpu))
    frame = served_model.predict(pd.DataFrame({"input_ids": ids}))
    if "last_logits" in frame:
        last = torch.tensor(frame["last_logits"][0], dtype=torch.float64)
        record["predict_last_logits_equal"] = bool(torch.equal(last, ref_cpu[-1].double()))
    if torch.cuda.is_available():
        del reference
        t = time.perf_counter()
        served.model.to("cuda")
        served_gpu = output(served.model, "cuda")
        served.model.to("cpu")
        free_gpu()
        ref_gpu_model, _, _ = load_variant(variant, device="cuda", fast=False)
        ref_gpu = output(ref_gpu_model, "cuda")
        del ref_gpu_model
        free_gpu()
        fast_model, _, _ = load_variant(variant, device="cuda", fast=True)
        fast_gpu = output(fast_model, "cuda")
        del fast_model
        record["gpu_equal"] = bool(torch.equal(served_gpu, ref_gpu))
        record["gpu_max_abs_diff"] = float((served_gpu - ref_gpu).abs().max())
        record["gpu_fast_path_max_abs_diff"] = float((served_gpu - fast_gpu).abs().max())
        record["gpu_s"] = time.perf_counter() - t
        record["device"] = torch.cuda.get_device_name()
    record["seconds"] = time.perf_counter() - started
    write_json(out, record)
    return record


def model_bench(
    name: str,
    model: str,
    model_dir: Path,
    args: argparse.Namespace,
    work: Path,
    device: str,
    deadline: float,
    flow_params: dict[str, Any],
) -> dict[str, Any]:
    """One model: library, flow (cold, registered), flow (warm), registry pull."""
    recipe = recipe_for(model_dir, args.calib_tokens, args.window)
    evaluation = {
        "max_tokens": args.eval_tokens,
        "window": args.window,
        "latency_workload": {
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "repeats": args.repeats,
        },
    }
    rec: dict[str, Any] = {"model": model, "recipe": recipe, "evaluation": evaluation}
    rec["flow_params"] = flow_params
    print(f"[{name}] library", flush=True)
    rec["library"] = library_job(model, recipe, work / "library", device, evaluation)
    print(f"[{name}] library {rec['library']['seconds']:.1f} s; flow (cold)", flush=True)
    call = FlowCall(model, recipe, evaluation, flow_params, register_as=f"ffsplit-{name}")
    flow = flow_job(call, work / "flow", cold=True)
    rec["flow"] = flow
    work_s = flow["wall_s"] - flow["stage_seconds"].get("register", 0.0)
    rec["pipeline_overhead_pct"] = 100.0 * (work_s / rec["library"]["seconds"] - 1.0)
    print(
        f"[{name}] flow {flow['wall_s']:.1f} s ({rec['pipeline_overhead_pct']:+.1f}%)", flush=True
    )
    if flow.get("registered"):
        rec["registry"] = registry_record(flow["registered"])
    if time.monotonic() < deadline - args.warm_reserve_s:
        warm = flow_job(call, work / "flow", cold=False)
        rec["flow_warm"] = {
            k: warm[k] for k in ("flow_run_id", "wall_s", "stage_seconds", "cached")
        }
        rec["fixed_orchestration_pct"] = 100.0 * warm["wall_s"] / rec["library"]["seconds"]
    else:
        rec["flow_warm"] = {"skipped": "time budget"}
    if "registry" in rec and time.monotonic() < deadline - args.pull_reserve_s:
        print(f"[{name}] registry pull", flush=True)
        left = max(30.0, deadline - time.monotonic() - 10)
        rec["registry_pull"] = pull_in_fresh_process(
            rec["registry"]["uri"], flow["variant"], work / "pull.json", left
        )
    else:
        rec["registry_pull"] = {"skipped": "time budget or no registration"}
    return rec


@contextlib.contextmanager
def services(home: Path) -> Iterator[dict[str, Any]]:
    from services.stack import StackConfig, local_stack, stack_status

    started = time.perf_counter()
    with local_stack(StackConfig(home=home, timeout_s=240.0)) as state:
        status = stack_status(home)
        info = {
            "start_s": time.perf_counter() - started,
            "services": {
                n: {k: s.get(k) for k in ("url", "startup_s", "rss_mib", "healthy")}
                for n, s in status["services"].items()
            },
            "env": {k: v for k, v in state.env().items() if k.endswith(("_URL", "_URI"))},
        }
        yield info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tasks.runtime import WORKER_ENV

    deadline = time.monotonic() + args.budget_s
    work = args.work.resolve()
    payload = work / "payload"
    os.environ.update({**WORKER_ENV, **RUN_ENV})
    os.environ["FFSPLIT_CACHE"] = str(payload / "cache")
    os.environ["FFSPLIT_HOME"] = str(work / "home")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"machine": machine(), "device": device, "models": {}}
    install_json = work / "install.json"
    if install_json.is_file():
        result["install"] = json.loads(install_json.read_text())
    result["plan"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.json, result)
    tokenizer = payload / "tokenizers" / "smollm2-135m"
    jobs = []
    if args.packaged:
        jobs.append(("packaged", args.packaged, None))
    if args.llama_layers > 0:
        jobs.append(("llama2-7b-config", None, args.llama_layers))
    with services(work / "stack") as info:
        result["services"] = info
        write_json(args.json, result)
        for name, packaged, layers in jobs:
            try:
                if packaged is not None:
                    from ffsplit.models.registry import resolve_model

                    model, model_dir = packaged, resolve_model(packaged).path
                    name = packaged
                    params = {"profile_units": args.units, "compress_shards": args.small_shards}
                else:
                    from bench.multigpu import build_model_folder, model_spec

                    spec = model_spec("llama2-7b", layers)
                    if device == "cpu":  # the CPU dry run: the same code on tiny shapes
                        spec = model_spec("tiny-llama")
                    model_dir = work / "models" / spec.name
                    built = build_model_folder(spec, model_dir, tokenizer, device)
                    result["models"].setdefault(name, {})["built"] = built
                    model = str(model_dir)
                    params = {"profile_units": args.units, "compress_shards": args.shards}
                free_gpu()
                rec = model_bench(
                    name, model, Path(model_dir), args, work / name, device, deadline, params
                )
                result["models"].setdefault(name, {}).update(rec)
            except Exception as exc:
                result["models"].setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
                result["models"][name]["traceback"] = traceback.format_exc()[-4000:]
                print(f"[{name}] failed: {exc}", flush=True)
            write_json(args.json, result)
        gpus = torch.cuda.device_count()
        if gpus >= 2 and "llama2-7b-config" in result["models"]:
            result["multigpu"] = multigpu(args, work, result)
        else:
            result["multigpu"] = {
                "skipped": f"{gpus} GPU(s) here: the 1-vs-2-GPU comparison needs nvidia-h200-x2 "
                "(bench/multigpu.py; tested on CPU with 1 vs 2 Ray CPU workers)"
            }
    result["seconds"] = args.budget_s - (deadline - time.monotonic())
    write_json(args.json, result)
    return result


def multigpu(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> dict[str, Any]:
    from bench.multigpu import BenchConfig, run_benchmark

    built = result["models"]["llama2-7b-config"].get("built")
    if not built:
        return {"skipped": "the 7B-config model was not built"}
    recipe = result["models"]["llama2-7b-config"].get("recipe") or {}
    config = BenchConfig(
        units=args.multigpu_units,
        shards=args.shards,
        profile={**recipe.get("profile", {}), "tokens": args.multigpu_tokens},
        recipe={k: v for k, v in recipe.items() if k != "profile"},
    )
    try:
        return run_benchmark(Path(built["path"]), config, [1, 2], gpus=True, work=work / "multigpu")
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "install", "run", "pull"):
        p = sub.add_parser(name)
        p.add_argument("--json", type=Path, default=None)
        if name in ("status", "install"):
            p.add_argument("--carry", type=Path, default=REPO_ROOT / ".gpucarry")
        if name in ("install", "run"):
            p.add_argument("--work", type=Path, default=Path("/tmp/ffsplit-gpu"))
        if name == "install":
            p.add_argument("--site", type=Path, default=Path("/tmp/site"))
    pull_parser = sub.choices["pull"]
    pull_parser.add_argument("--uri", required=True)
    pull_parser.add_argument("--variant", required=True)
    r = sub.choices["run"]
    r.add_argument("--packaged", default="minilm-l6", help="packaged model ('' to skip)")
    r.add_argument("--llama-layers", type=int, default=32, help="0 skips the 7B-config model")
    r.add_argument("--calib-tokens", type=int, default=16384)
    r.add_argument("--eval-tokens", type=int, default=8192)
    r.add_argument("--window", type=int, default=512)
    r.add_argument("--prompt-tokens", type=int, default=128)
    r.add_argument("--decode-tokens", type=int, default=32)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--units", type=int, default=2, help="profile units of the flows")
    r.add_argument("--shards", type=int, default=4, help="compress shards (7B-config)")
    r.add_argument("--small-shards", type=int, default=2, help="compress shards (packaged)")
    r.add_argument("--multigpu-units", type=int, default=8)
    r.add_argument("--multigpu-tokens", type=int, default=65536)
    r.add_argument("--budget-s", type=float, default=560.0, help="stop optional steps by then")
    r.add_argument("--warm-reserve-s", type=float, default=60.0)
    r.add_argument("--pull-reserve-s", type=float, default=45.0)
    args = parser.parse_args(argv)
    if args.command == "status":
        status = carry_status(args.carry)
        status.pop("manifest", None)
        print(json.dumps(status, indent=1))
        write_json(args.json, status)
    elif args.command == "install":
        print(json.dumps(install(args.carry, args.work.resolve(), args.site.resolve()), indent=1))
    elif args.command == "pull":
        record = pull(args.uri, args.variant, args.json or Path("pull.json"))
        print(json.dumps(record, indent=1))
    else:
        result = run(args)
        head = {
            name: {
                k: rec.get(k)
                for k in ("pipeline_overhead_pct", "fixed_orchestration_pct", "error")
                if k in rec
            }
            for name, rec in result["models"].items()
        }
        print(json.dumps({"seconds": result["seconds"], "models": head}, indent=1))
        failed = [name for name, rec in result["models"].items() if "error" in rec]
        if failed or not result["models"]:
            print(f"flow_gpu: failed for {', '.join(failed) or 'every model'} (see the JSON)")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
