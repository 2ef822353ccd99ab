"""The pipeline's own profile and compress stages on 1 GPU, then on 2 (issues 5 and 15).

No second implementation: each setting runs the flows' Ray stages as the compress flow does,
tasks.profile.profile_unit (one Ray task per calibration unit, a GPU each where there are GPUs),
tasks.aggregate.aggregate (the merge, in unit order) and tasks.compress.compress_shard (one task per
layer shard), in its own embedded Ray of 1 or 2 GPUs (on a CPU machine: 1 or 2 CPUs) and its own
cache. Units and shards are run parameters, never the worker count, so both settings must give
bitwise-equal statistics (every unit file and the merge, tensor by tensor) and shard weights
(sha256 of each shard's weights file); the run checks both and reports the profile stage's scaling.

Each setting first profiles one tiny unit per worker into a scratch cache (the warm-up), so every
worker holds the model (tasks.runtime.base_model keeps it per worker) and the timed profile stage
measures profiling, as a long-running pipeline's warm workers do; the warm-up's time is recorded.

    python bench/multigpu.py --model llama2-7b --settings 1,2 --json OUT.json     # 2-GPU machine
    python bench/multigpu.py --model tiny-llama --cpu --settings 1,2 --json OUT   # CPU, 2 workers

The 7B-config model is Llama-2-7B's shapes with SmolLM2's tokenizer (vocabulary 49152, so the
packaged calibration text tokenizes to valid ids) and seeded random bf16 weights, built on the
machine (build_model_folder) and saved as an HF folder: the stages load it like any local model.
bench/flow_gpu.py calls run_benchmark in the same device call when the machine has 2 GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ffsplit.errors import FFSplitError  # noqa: E402

# ----------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture model from its configuration and a seed (random weights)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152  # SmolLM2's tokenizer, so the packaged calibration text gives valid ids
    positions: int = 4096
    seed: int = 0
    dtype: str = "bfloat16"
    std: float = 0.02  # Llama's initializer_range

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise FFSplitError(f"model spec {self.name}: dtype must be bfloat16 or float32")

    def config(self) -> Any:
        from transformers import LlamaConfig

        config = LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=self.positions,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        config.architectures = ["LlamaForCausalLM"]
        return config

    @property
    def parameters(self) -> int:
        d, m, v = self.hidden, self.intermediate, self.vocab
        kv = d * self.kv_heads // self.heads
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * m + 2 * d
        return self.layers * per_layer + 2 * v * d + d


MODELS = {
    # Llama-2-7B (hidden 4096, FFN 11008, 32 layers, 32 heads) with a 49152-token vocabulary.
    "llama2-7b": ModelSpec("llama2-7b", 4096, 11008, 32, 32, 32),
    # The CPU tests' model: the same code path, seconds on 2 cores.
    "tiny-llama": ModelSpec("tiny-llama", 64, 176, 4, 4, 2, positions=512),
}


def model_spec(name: str, layers: int | None = None) -> ModelSpec:
    """A spec from MODELS, with another layer count if given (same shapes per layer)."""
    if name not in MODELS:
        raise FFSplitError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    spec = MODELS[name]
    if layers is None or layers == spec.layers:
        return spec
    if layers < 1:
        raise FFSplitError(f"layers must be >= 1, got {layers}")
    return replace(spec, name=f"{spec.name}-{layers}l", layers=layers)


def build_model(spec: ModelSpec, device: str) -> Any:
    """The spec's model on `device`, every parameter drawn from its own seeded generator
    (N(0, std^2); norm weights 1), so the same device type always builds the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    target = torch.device(device)
    with target:
        model = AutoModelForCausalLM.from_config(
            spec.config(), dtype=getattr(torch, spec.dtype), attn_implementation="sdpa"
        )
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            generator = torch.Generator(device=target).manual_seed(spec.seed * 1_000_003 + i)
            param.normal_(0.0, spec.std, generator=generator)
    return model.eval().requires_grad_(False)


def build_model_folder(spec: ModelSpec, folder: Path, tokenizer_dir: Path, device: str) -> dict:
    """The spec's model saved as an HF folder (safetensors, its dtype) with the tokenizer files of
    tokenizer_dir copied in; built on `device` (seconds on a GPU). Returns what it did."""
    import torch

    from ffsplit.models.folder import TOKENIZER_FILES

    started = time.perf_counter()
    copied = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    if not copied:
        raise FFSplitError(f"{tokenizer_dir}: no tokenizer files")
    model = build_model(spec, device)
    built = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for name in copied:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "spec": asdict(spec),
        "parameters": spec.parameters,
        "path": str(folder),
        "weights_gib": round(size / 2**30, 2),
        "build_s": built - started,
        "save_s": time.perf_counter() - built,
        "device": device,
    }


# ----------------------------------------------------------------------- who holds the GPUs


def _process_title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80] or "?"


class GpuSampler:
    """Polls, every `period` s: the processes holding memory on each GPU (NVML, else nvidia-smi)
    with their titles (a Ray worker shows `ray::profile_unit` while it runs that task) and, once
    Ray is up in this process, its free resources (a GPU held by a task is not free).

    Records per (GPU index, title): the largest memory seen and the first/last time seen.
    """

    def __init__(self, period: float = 0.5) -> None:
        self.period_s = period
        self.holders: dict[str, dict[str, Any]] = {}
        self.ray_free_gpus: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self._query = self._nvml_query()

    def _nvml_query(self) -> Callable[[], list[tuple[int, int, float]]] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # no NVML (CPU machine) or no driver
            handles = None
        if handles:
            self.source = "nvml"

            def query() -> list[tuple[int, int, float]]:
                out = []
                for index, handle in enumerate(handles):
                    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        used = (proc.usedGpuMemory or 0) / 2**20
                        out.append((index, int(proc.pid), used))
                return out

            return query
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"

            def smi() -> list[tuple[int, int, float]]:
                text = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-compute-apps=gpu_bus_id,pid,used_memory",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                buses: dict[str, int] = {}
                out = []
                for line in text.splitlines():
                    parts = [p.strip() for p in line.split(",")]
                    if len(parts) == 3 and parts[1].isdigit():
                        index = buses.setdefault(parts[0], len(buses))
                        out.append((index, int(parts[1]), float(parts[2] or 0)))
                return out

            return smi
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            now = time.perf_counter() - self._t0
            if self._query is not None:
                with contextlib.suppress(Exception):
                    for index, pid, used in self._query():
                        key = f"gpu{index}:{_process_title(pid)}"
                        entry = self.holders.setdefault(
                            key, {"max_mib": 0.0, "first_s": now, "last_s": now, "pids": []}
                        )
                        entry["max_mib"] = max(entry["max_mib"], round(used, 1))
                        entry["last_s"] = now
                        if pid not in entry["pids"]:
                            entry["pids"].append(pid)
            with contextlib.suppress(Exception):
                import ray

                if ray.is_initialized():
                    free = float(ray.available_resources().get("GPU", 0.0))
                    if not self.ray_free_gpus or self.ray_free_gpus[-1][1] != free:
                        self.ray_free_gpus.append((round(now, 2), free))

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def report(self) -> dict[str, Any]:
        return {
            key: getattr(self, key) for key in ("source", "period_s", "holders", "ray_free_gpus")
        }


# ------------------------------------------------------------------------------------ a setting


@dataclass(frozen=True)
class BenchConfig:
    """What every setting runs; everything that decides the results, nothing about workers."""

    units: int = 8
    shards: int = 4
    profile: dict[str, Any] | None = None  # a ProfileConfig dict
    recipe: dict[str, Any] | None = None  # a Recipe dict (its profile is replaced by `profile`)
    warm_up: bool = True

    def parsed(self) -> tuple[Any, Any]:
        from ffsplit.config import ProfileConfig, Recipe

        profile = ProfileConfig.from_dict(self.profile or {})
        recipe = Recipe.from_dict({**(self.recipe or {}), "profile": profile.to_dict()})
        if self.units < 1 or self.shards < 1:
            raise FFSplitError(f"units and shards must be >= 1, got {self.units}, {self.shards}")
        if profile.tokens // profile.window < self.units:
            raise FFSplitError(
                f"{self.units} units need {self.units} calibration windows; the profile has "
                f"{profile.tokens // profile.window}"
            )
        return profile, recipe


def _shard_device(path: str) -> str | None:
    from ffsplit.variant.shards import read_shard_spec

    return (read_shard_spec(path).get("meta") or {}).get("device")


def _profile_calls(base: Any, profile: Any, units: int, paths: list[str]) -> list[dict[str, Any]]:
    """The profile stage's calls, one per calibration unit (as the compress flow makes them)."""
    return [
        {"model": base, "profile": profile.to_dict(), "unit": u, "units": units, "out": p}
        for u, p in enumerate(paths)
    ]


def _compress_calls(
    base: Any, recipe: Any, merged: Any, shards: int, root: str
) -> list[dict[str, Any]]:
    """The compress stage's calls, one per layer shard (statistics only where the recipe reads
    them, as the compress flow does)."""
    from tasks.compress import layer_shards, shard_path

    compression = recipe.unhealed()
    stats = merged if recipe.needs_statistics else None
    return [
        {
            "model": base,
            "stats_path": None if stats is None else stats.stats_path,
            "recipe": compression.to_dict(),
            "layers": layers,
            "out": shard_path(
                root, base, None if stats is None else stats.key, compression, layers
            ),
        }
        for layers in layer_shards(base.layers, shards)
    ]


def _stages(
    base: Any, config: BenchConfig, workers: int, cache: Path, record: dict[str, Any]
) -> tuple[list[Any], Any, list[Any]]:
    """The warm-up (one tiny unit per worker: every worker loads the model), then profile,
    aggregate and compress, each timed into ``record``; returns units, merge and shards."""
    from tasks.aggregate import aggregate, aggregate_path
    from tasks.compress import compress_shard
    from tasks.profile import profile_unit, unit_paths

    profile, recipe = config.parsed()
    root = str(cache / "cache")
    if config.warm_up:
        warm = profile.replace(tokens=profile.window * workers)
        t = time.perf_counter()
        warm_paths = unit_paths(str(cache / "warm"), base, warm, workers)
        profile_unit.run_many(_profile_calls(base, warm, workers, warm_paths))
        record["warm_up_s"] = time.perf_counter() - t
    paths = unit_paths(root, base, profile, config.units)
    t = time.perf_counter()
    units = profile_unit.run_many(_profile_calls(base, profile, config.units, paths))
    record["profile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = aggregate.run(model=base, unit_paths=paths, out=aggregate_path(root, paths))
    record["aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    shards = compress_shard.run_many(_compress_calls(base, recipe, merged, config.shards, root))
    record["compress_s"] = time.perf_counter() - t
    return units, merged, shards


def run_setting(
    base: Any, config: BenchConfig, workers: int, gpus: bool, cache: Path, log: Callable = print
) -> dict[str, Any]:
    """Profile, aggregate and compress once in an embedded Ray of `workers` GPUs (gpus) or CPUs,
    with the flows' stages; a fresh cache each time. Returns timings and the stage records."""
    import ray

    from tasks.runtime import cluster_info, ray_session

    config.parsed()  # a bad config fails before Ray starts
    if ray.is_initialized():  # it would be reused, with its own worker count
        raise FFSplitError("Ray is already up in this process: each setting starts its own Ray")
    if cache.exists():
        shutil.rmtree(cache)
    record: dict[str, Any] = {"workers": workers, "gpus": workers if gpus else 0}
    started = time.perf_counter()
    session = {"num_gpus": workers} if gpus else {"num_cpus": workers}
    with ray_session(**session) as cluster, GpuSampler() as sampler:
        record["cluster"] = cluster
        record["ray_start_s"] = time.perf_counter() - started
        units, merged, shards = _stages(base, config, workers, cache, record)
        record["cluster_after"] = cluster_info()
    record["total_s"] = time.perf_counter() - started
    record["gpu_holders"] = sampler.report()
    record["units"] = [u.to_dict() for u in units]
    record["merged"] = {**merged.to_dict(), "summary": None}
    record["shards"] = [{**s.to_dict(), "device": _shard_device(s.path)} for s in shards]
    record["profile_tokens"] = sum(int(u.tokens or 0) for u in units)
    record["profile_tokens_per_s"] = record["profile_tokens"] / record["profile_s"]
    log(
        f"[{workers} {'GPU' if gpus else 'CPU'}] profile {record['profile_s']:.2f} s, aggregate "
        f"{record['aggregate_s']:.2f} s, compress {record['compress_s']:.2f} s"
    )
    return record


# ---------------------------------------------------------------------------------- comparison


def stats_equal(a: str, b: str) -> bool:
    """Two statistics files hold bitwise-equal statistics (every layer, every field)."""
    import torch

    from ffsplit.profiling import load_stats

    first, second = load_stats(a, packed=True), load_stats(b, packed=True)
    if set(first.layers) != set(second.layers):
        return False
    for layer, x in first.layers.items():
        y = second.layers[layer]
        if (x.tokens, x.hit_top_k) != (y.tokens, y.hit_top_k):
            return False
        for name in ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden"):
            p, q = getattr(x, name, None), getattr(y, name, None)
            if (p is None) != (q is None) or (p is not None and not torch.equal(p, q)):
                return False
    return True


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Whether two settings gave the same statistics and shard weights, bit for bit."""
    from ffsplit.variant.shards import read_shard_spec
    from tasks.aggregate import stats_file

    units = [
        stats_equal(a["path"], b["path"])
        for a, b in zip(first["units"], second["units"], strict=True)
    ]
    merged = stats_equal(
        str(stats_file(first["merged"]["path"])), str(stats_file(second["merged"]["path"]))
    )
    shards = [
        read_shard_spec(a["path"])["weights_sha256"] == read_shard_spec(b["path"])["weights_sha256"]
        for a, b in zip(first["shards"], second["shards"], strict=True)
    ]
    return {
        "unit_stats_bitwise_equal": all(units),
        "merged_stats_bitwise_equal": merged,
        "stats_bitwise_equal": all(units) and merged,
        "shard_weights_bitwise_equal": all(shards),
        "per_unit": units,
        "per_shard": shards,
    }


def run_benchmark(
    model_dir: Path,
    config: BenchConfig,
    settings: Sequence[int],
    *,
    gpus: bool,
    work: Path,
    json_path: Path | None = None,
    log: Callable = print,
) -> dict[str, Any]:
    """Every setting (worker count) in turn, then the comparison; the JSON is rewritten after
    each setting, so a run cut short keeps what it measured."""
    from tasks.records import BaseModel

    base = BaseModel.resolve(str(model_dir))
    profile, recipe = config.parsed()
    result: dict[str, Any] = {
        "model": base.to_dict(),
        "units": config.units,
        "shards": config.shards,
        "profile": profile.to_dict(),
        "recipe": recipe.to_dict(),
        "device": "gpu" if gpus else "cpu",
        "settings": {},
    }

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    for workers in settings:
        key = f"{workers}{'gpu' if gpus else 'cpu'}"
        try:
            result["settings"][key] = run_setting(base, config, workers, gpus, work / key, log=log)
        except Exception as exc:  # keep what ran; report the failure
            result["settings"][key] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"[{key}] failed: {exc}")
        save()
    done = [k for k, v in result["settings"].items() if "error" not in v]
    if len(done) >= 2:
        one = min(done, key=lambda k: result["settings"][k]["workers"])
        two = max(done, key=lambda k: result["settings"][k]["workers"])
        a, b = result["settings"][one], result["settings"][two]
        result["comparison"] = {"between": [one, two], **compare(a, b)}
        result["profile_scaling"] = a["profile_s"] / b["profile_s"]
        result["compress_scaling"] = a["compress_s"] / b["compress_s"]
        result["stage_scaling"] = (a["profile_s"] + a["aggregate_s"] + a["compress_s"]) / (
            b["profile_s"] + b["aggregate_s"] + b["compress_s"]
        )
        save()
    return result


# ------------------------------------------------------------------------------------------ CLI


def default_recipe() -> dict[str, Any]:
    """Heavy neurons kept bf16, light ones int4 (group 64), heavy set by score: the issue-15
    recipe. Its budget is the all-int4 point, computed by ffsplit's own byte accounting."""
    return {
        "method": "quant",
        "quant": {
            "heavy_bits": 16,
            "ladder": [4],
            "group_size": 64,
            "allocation": "two-level",
            "gptq": False,
            "gptq_down": False,
        },
        "selection": "score",
        "heavy_ratio": 0.1,
    }


def all_int4_reduction(hidden: int, neurons: int, heavy_ratio: float, group_size: int) -> float:
    """all_int4_budget of a gated FFN (the Llama models here)."""
    from ffsplit.compress.budget import FFNShape

    return all_int4_budget(FFNShape(d=hidden, m=neurons, gated=True), heavy_ratio, group_size)


def all_int4_budget(shape: Any, heavy_ratio: float, group_size: int) -> float:
    """The FFN reduction at which every light neuron is int4 and every heavy one 16-bit (rounded
    down to 6 digits, so the budget solver lands on exactly that mix); shape: an FFNShape."""
    import math

    from ffsplit.compress.budget import dense_ffn_bytes, quant_bytes, reduction
    from ffsplit.selection import heavy_count

    heavy = heavy_count(shape.m, heavy_ratio)
    compressed = quant_bytes(shape, heavy, 16, {4: shape.m - heavy}, group_size)
    return math.floor(reduction(dense_ffn_bytes(shape), compressed) * 1e6) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, same shapes")
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2 tokenizer folder")
    parser.add_argument("--settings", default="1,2", help="worker counts, run in this order")
    parser.add_argument("--cpu", action="store_true", help="CPU workers (no GPUs asked for)")
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ffsplit-multigpu"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = model_spec(args.model, args.layers)
    if args.cpu:
        spec = replace(spec, dtype="float32")
    folder = args.work / "model"
    built = build_model_folder(spec, folder, args.tokenizer, "cpu" if args.cpu else "cuda")
    recipe = default_recipe()
    recipe["ffn_reduction"] = all_int4_reduction(spec.hidden, spec.intermediate, 0.1, 64)
    config = BenchConfig(
        units=args.units,
        shards=args.shards,
        profile={"tokens": args.calib_tokens, "window": args.window, "collect_grams": False},
        recipe=recipe,
    )
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    result = run_benchmark(
        folder,
        config,
        [int(s) for s in args.settings.split(",") if s],
        gpus=not args.cpu,
        work=args.work / "runs",
        json_path=args.json,
    )
    result["built"] = built
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    headline = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    print(json.dumps({**headline, "comparison": result.get("comparison")}, indent=1))
    return 0


if __name__ == "__main__":
    # Through the importable module, so Ray workers import bench.multigpu by reference.
    from bench import multigpu

    try:
        raise SystemExit(multigpu.main())
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
