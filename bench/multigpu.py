"""The pipeline's profile and compress stages as Ray tasks on GPUs: 1 GPU against 2 (issue 5).

One Ray actor per GPU (`num_gpus=1`) builds the model once; its method calls are the stage tasks,
handed out by `ray.util.ActorPool` to whichever worker is free:
- profile: the calibration windows are cut into `units` fixed units (windows u, u+U, ..., as the
  pipeline cuts them) and the units into `ranges` contiguous ranges. One task per range runs its
  units in order through the model with the statistics hooks (ffsplit.profiling) and writes the
  range's partial sums (float64 Grams included) as raw hand-off files in a scratch folder. Grams
  travel as the packed lower triangle of their symmetric part (G + G^T)/2, the matrix whitening
  uses anyway: half the bytes. The hand-off is the part of the profile stage that does not
  shrink with more GPUs (the writers of one host share its memory bandwidth).
- compress: one task per shard of consecutive layers (tasks.compress.layer_shards) merges each
  layer's range partials in range order (ffsplit.profiling.stats.merge), then runs
  ffsplit.compress.recipe.compress_layer (activation-aware SVD, on the GPU) and writes a shard
  folder (ffsplit.variant.shards.save_shard) that the CPU-side flow assembles into a variant.
Ranges and shards are run parameters, never the worker count, and partials merge in a fixed
order, so 1 and 2 workers must give the same statistics and shards bit for bit; the run checks it
(bit fingerprints and probes of the merged statistics, sha256 of the shard weights).

Why not tasks/profile.py's per-unit files: they import Prefect (absent on the GPU machine), and one
unit's statistics of a 7B model hold 35 GB (33 GiB) of float64 Grams, so eight unit files would
be ~280 GB of I/O; range partials keep that at ranges x 35 GB, written once into RAM (tmpfs).

    python bench/multigpu.py --model llama2-7b --settings 2,1 --json OUT.json   # GPU machine
    python bench/multigpu.py --model tiny-llama --cpu --settings 1,2 ...        # CPU smoke
    python bench/multigpu.py --plot bench/results/multigpu-h200.json            # chart

The 7B model is Llama-2-7B's configuration with SmolLM2's vocabulary (49152, so the real
calibration ids are valid) and seeded random bf16 weights, built on each GPU (no weights travel).
Calibration ids come from .gpucarry/calibration.safetensors (`--prepare` writes it on the CPU
machine from the packaged Wikipedia calibration split and SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ffsplit.errors import FFSplitError  # noqa: E402
from ffsplit.profiling.stats import LayerStats, merge  # noqa: E402

CALIBRATION_FILE = REPO_ROOT / ".gpucarry" / "calibration.safetensors"
PARTIAL_INDEX = "index.json"
_NUMPY = {torch.float64: np.float64, torch.int64: np.int64, torch.float32: np.float32}
_FIELDS = ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden")
_GRAMS = ("gram_in", "gram_hidden")
TRIL = "tril"  # index tag of a field stored as its packed lower triangle (row-major)


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
    vocab: int = 49152  # SmolLM2's tokenizer, so the real calibration ids are valid
    positions: int = 4096
    seed: int = 0
    dtype: str = "bfloat16"
    std: float = 0.02  # Llama's initializer_range

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise FFSplitError(f"model spec {self.name}: dtype must be bfloat16 or float32")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

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


MODELS = {
    # Llama-2-7B (hidden 4096, FFN 11008, 32 layers, 32 heads) with a 49152-token vocabulary.
    "llama2-7b": ModelSpec("llama2-7b", 4096, 11008, 32, 32, 32),
    # The CPU smoke test's model: same code path, seconds on 2 cores.
    "tiny-llama": ModelSpec("tiny-llama", 64, 176, 4, 4, 2, positions=512, dtype="float32"),
}


def build_model(spec: ModelSpec, device: str | torch.device) -> nn.Module:
    """The spec's model on `device`, every parameter drawn from its own seeded generator.

    Each parameter i gets N(0, std^2) from a generator seeded with (seed, i) on the target device
    (norm weights 1), so every worker of the same device type builds the same weights.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            spec.config(), dtype=spec.torch_dtype, attn_implementation="sdpa"
        )
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            generator = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + i)
            param.normal_(0.0, spec.std, generator=generator)
    return model.eval().requires_grad_(False)


def bit_fingerprint(tensor: Tensor) -> int:
    """Order-sensitive checksum of a tensor's bits (equal bits <=> equal value, but for chance).

    Weighted sum of the 64/32-bit words with odd weights, modulo 2^64: any single changed bit
    changes it. Computed where the tensor lives (a 1 GB Gram never leaves the GPU for it).
    """
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.element_size() == 8:
        words = flat.view(torch.int64)
    elif flat.element_size() == 4:
        words = flat.view(torch.int32).to(torch.int64)
    else:
        words = flat.view(torch.int16).to(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) * 2 + 1
    return int((words * weights).sum().item())


def model_fingerprint(model: nn.Module) -> int:
    """Bit fingerprint of all parameters (in name order): workers built the same model."""
    total = 0
    for i, (_, param) in enumerate(sorted(model.named_parameters())):
        total = (total + (2 * i + 1) * bit_fingerprint(param)) % 2**64
    return total


# ------------------------------------------------------------------------------ partial sums I/O


def _write_fully(f: Any, view: memoryview) -> None:
    """Unbuffered writes may be partial (Linux caps one write at ~2 GiB): loop until done."""
    while len(view):
        view = view[f.write(view) :]


class RawWriter:
    """Writes tensors as raw files: device -> pinned staging buffer -> file, several at a time.

    Why: a plain device-to-file copy (pageable memory) ran at ~1.1 GB/s on the H200 machine, so
    the 33 GiB partial of a 7B range took 30 s, as long as its forward passes. Pinned buffers make
    the device copy a DMA; the file writes (which release the GIL) run in `threads` threads.
    """

    def __init__(self, device: str, threads: int, chunk_bytes: int = 256 << 20) -> None:
        self.device = device
        self.threads = max(1, threads)
        self.chunk = chunk_bytes
        self.staging: list[Tensor] = []
        if device.startswith("cuda"):
            self.staging = [
                torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(self.threads)
            ]

    def _write(self, slot: int, tensor: Tensor, path: Path) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        # In place, not truncated: a file preallocated by preallocate_partial keeps its pages.
        with open(path, "r+b" if path.exists() else "wb", buffering=0) as f:
            if not self.staging:
                _write_fully(f, memoryview(data.numpy()))
            else:
                buffer = self.staging[slot]
                for start in range(0, data.numel(), self.chunk):
                    part = data[start : start + self.chunk]
                    staged = buffer[: part.numel()]
                    staged.copy_(part)
                    _write_fully(f, memoryview(staged.numpy()))
            f.truncate(data.numel())

    def write_all(self, items: Sequence[tuple[Tensor, Path]]) -> None:
        """Write every (tensor, path); each thread owns one staging buffer."""
        if self.threads == 1:
            for tensor, path in items:
                self._write(0, tensor, path)
            return
        from concurrent.futures import ThreadPoolExecutor

        def work(slot: int) -> None:
            for tensor, path in items[slot :: self.threads]:
                self._write(slot, tensor, path)

        with ThreadPoolExecutor(self.threads) as pool:
            for future in [pool.submit(work, slot) for slot in range(self.threads)]:
                future.result()


def _lower_mask(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def pack_lower(gram: Tensor) -> Tensor:
    """The lower triangle of (G + G^T)/2, row by row: n(n+1)/2 values.

    A Gram computed by a GEMM can differ from its transpose in the last bits; its symmetric part
    is what whitening (ffsplit.compress.lowrank) works with, and it is exact for a symmetric G.
    """
    return ((gram + gram.T) / 2).masked_select(_lower_mask(gram.shape[0], gram.device))


def unpack_lower(packed: Tensor, n: int) -> Tensor:
    """The symmetric matrix whose lower triangle is `packed` (the upper one mirrors it)."""
    if packed.numel() != n * (n + 1) // 2:
        raise FFSplitError(f"packed triangle holds {packed.numel()} values, not {n * (n + 1) // 2}")
    out = torch.zeros(n, n, dtype=packed.dtype, device=packed.device)
    out.masked_scatter_(_lower_mask(n, packed.device), packed)
    return out + out.tril(-1).T


def partial_layout(stats: Mapping[int, LayerStats]) -> dict[str, int]:
    """File name -> bytes of a range's partial, as write_partial lays it out."""
    layout = {}
    for layer, st in stats.items():
        for name in _FIELDS:
            tensor = getattr(st, name)
            if tensor is None:
                continue
            n = tensor.shape[0]
            values = n * (n + 1) // 2 if name in _GRAMS else tensor.numel()
            layout[f"{layer}.{name}.bin"] = values * tensor.element_size()
    return layout


def preallocate_partial(stats: Mapping[int, LayerStats], folder: Path) -> int:
    """Allocate a range's partial files before profiling; returns the bytes allocated.

    Why: the GPU machine's RAM is backed by the host as it is first touched (about 3 s per
    8 GiB, KINDS.md), and pages freed on the guest can go back. Written into fresh tmpfs pages,
    the 16 GiB partial of a 7B range took 12.6 s instead of 1.5 s. Allocating the files while
    the workers start (as a serving system keeps its hand-off arena) keeps that out of the stage.
    """
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, size in partial_layout(stats).items():
        fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        total += size
    return total


def write_partial(
    stats: Mapping[int, LayerStats],
    folder: Path,
    meta: dict[str, Any],
    writer: RawWriter | None = None,
) -> int:
    """Write one range's statistics as raw files (read back by read_partial_layer).

    The index is written last: a folder without it is incomplete. Returns the bytes written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"meta": meta, "layers": {}}
    items: list[tuple[Tensor, Path]] = []
    written = 0
    for layer, s in sorted(stats.items()):
        entry: dict[str, Any] = {"tokens": s.tokens, "hit_top_k": s.hit_top_k, "fields": {}}
        for name in _FIELDS:
            tensor = getattr(s, name)
            if tensor is None:
                continue
            if tensor.dtype not in _NUMPY:
                raise FFSplitError(f"layer {layer} {name}: cannot write dtype {tensor.dtype}")
            field = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
            if name in _GRAMS:
                tensor = pack_lower(tensor)
                field.append(TRIL)
            items.append((tensor, folder / f"{layer}.{name}.bin"))
            entry["fields"][name] = field
            written += tensor.numel() * tensor.element_size()
        index["layers"][str(layer)] = entry
    # Largest first, so the threads finish together.
    items.sort(key=lambda item: -item[0].numel() * item[0].element_size())
    (writer or RawWriter(str(next(iter(stats.values())).sum_sq.device), 1)).write_all(items)
    (folder / PARTIAL_INDEX).write_text(json.dumps(index, sort_keys=True))
    return written


def read_partial_layer(folder: Path, layer: int, device: str | torch.device) -> LayerStats:
    """One layer's statistics from a partial folder, on `device`."""
    index_file = Path(folder) / PARTIAL_INDEX
    if not index_file.is_file():
        raise FFSplitError(f"{folder}: no {PARTIAL_INDEX}; the profile task did not finish")
    entry = json.loads(index_file.read_text())["layers"].get(str(layer))
    if entry is None:
        raise FFSplitError(f"{folder}: no statistics for layer {layer}")
    tensors: dict[str, Tensor | None] = dict.fromkeys(_FIELDS)
    for name, (dtype, shape, *tags) in entry["fields"].items():
        packed = TRIL in tags
        data = np.memmap(
            Path(folder) / f"{layer}.{name}.bin",
            dtype=_NUMPY[getattr(torch, dtype)],
            mode="c",
            shape=(shape[0] * (shape[0] + 1) // 2,) if packed else tuple(shape),
        )
        tensor = torch.from_numpy(data).to(device).clone()
        del data
        tensors[name] = unpack_lower(tensor, shape[0]) if packed else tensor
    return LayerStats(tokens=int(entry["tokens"]), hit_top_k=int(entry["hit_top_k"]), **tensors)


def merged_layer(partials: Sequence[str | Path], layer: int, device: str) -> LayerStats:
    """A layer's statistics over all ranges: ((r0 + r1) + r2) + ..., in range order."""
    merged = read_partial_layer(Path(partials[0]), layer, device)
    for folder in partials[1:]:
        merged = merge(merged, read_partial_layer(Path(folder), layer, device))
    return merged


def stats_probe(stats: LayerStats) -> dict[str, Tensor]:
    """Small exact views of merged statistics, to diff two runs: vectors, Gram diagonals and
    Gram products with a fixed +-1 vector (any changed Gram entry shows up in them)."""

    def signs(n: int) -> Tensor:
        gen = torch.Generator().manual_seed(n)
        return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1).to(
            stats.sum_sq.device
        )

    out = {"sum_sq": stats.sum_sq, "max_abs": stats.max_abs, "hits": stats.hits.double()}
    for name in ("gram_in", "gram_hidden"):
        gram = getattr(stats, name)
        if gram is not None:
            out[f"{name}.diag"] = gram.diagonal()
            out[f"{name}.probe"] = gram @ signs(gram.shape[0])
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def stats_fingerprints(stats: LayerStats) -> dict[str, int]:
    out = {"tokens": stats.tokens}
    for name in _FIELDS:
        tensor = getattr(stats, name)
        if tensor is not None:
            out[name] = bit_fingerprint(tensor)
    return out


# -------------------------------------------------------------------------------- the stage worker


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StageWorker:
    """One Ray actor per device: builds the model once, then runs profile and compress tasks."""

    def __init__(self, spec: dict[str, Any], profile: dict[str, Any]) -> None:
        from ffsplit.adapters import get_adapter
        from ffsplit.config import ProfileConfig
        from ffsplit.profiling.profiler import attach_stat_hooks
        from tasks.runtime import set_task_threads, task_device

        started = time.perf_counter()
        self.threads = set_task_threads()
        self.device = task_device()
        self.spec = ModelSpec(**spec)
        self.model = build_model(self.spec, self.device)
        self.adapter = get_adapter(self.model)
        # The statistics accumulators live beside the model for the worker's life (35 GB of
        # float64 Grams for a 7B model: allocated once, zeroed per range).
        self.profile_config = ProfileConfig.from_dict(profile)
        self.hooks = attach_stat_hooks(self.model, self.adapter, self.profile_config)
        self.writer = RawWriter(self.device, self.threads)
        _sync(self.device)
        self.build_s = time.perf_counter() - started
        self.fingerprint = model_fingerprint(self.model)

    def preallocate(self, folders: list[str]) -> dict[str, Any]:
        """Allocate the partial files of `folders` (preallocate_partial), timed."""
        started = time.perf_counter()
        written = sum(preallocate_partial(self.hooks.stats, Path(f)) for f in folders)
        return {
            "folders": folders,
            "gib": written / 2**30,
            "seconds": time.perf_counter() - started,
        }

    def describe(self) -> dict[str, Any]:
        import ray

        info = {
            "pid": os.getpid(),
            "device": self.device,
            "threads": self.threads,
            "build_s": self.build_s,
            "model_fingerprint": str(self.fingerprint),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        if self.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name()
            info["memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        return info

    def _reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _peak_gib(self) -> float | None:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**30
        return None

    def _free(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @torch.no_grad()
    def profile_range(
        self, ids: Tensor, units: list[int], total_units: int, out: str
    ) -> dict[str, Any]:
        """Statistics of calibration units `units` (in order), written as one partial folder."""
        config = self.profile_config
        self._reset_peak()
        started = time.perf_counter()
        for stats in self.hooks.stats.values():  # fresh sums: 0 + x is x, bit for bit
            stats.tokens = 0
            for name in _FIELDS:
                tensor = getattr(stats, name)
                if tensor is not None:
                    tensor.zero_()
        tokens = 0
        for unit in units:
            windows = ids[unit::total_units]
            for start in range(0, windows.shape[0], config.batch_size):
                batch = windows[start : start + config.batch_size].to(self.device)
                # Only the FFN hooks matter: no KV cache, logits of the last position only.
                self.model(input_ids=batch, use_cache=False, logits_to_keep=1)
                tokens += batch.numel()
        _sync(self.device)
        forward_s = time.perf_counter() - started
        meta = {"units": units, "total_units": total_units, "profile": config.to_dict()}
        written = write_partial(self.hooks.stats, Path(out), meta, self.writer)
        save_s = time.perf_counter() - started - forward_s
        peak = self._peak_gib()
        self._free()
        return {
            "units": units,
            "tokens": tokens,
            "forward_s": forward_s,
            "save_s": save_s,
            "seconds": forward_s + save_s,
            "partial_gib": written / 2**30,
            "peak_gpu_gib": peak,
            "pid": os.getpid(),
            "device": self.device,
        }

    @torch.no_grad()
    def compress_shard(
        self, layers: list[int], partials: list[str], recipe: dict[str, Any], out: str
    ) -> dict[str, Any]:
        """Merge each layer's range partials in order, compress it, write the shard folder."""
        from safetensors.torch import save_file

        from ffsplit.compress.recipe import compress_layer
        from ffsplit.config import Recipe
        from ffsplit.variant.shards import read_shard_spec, save_shard

        config = Recipe.from_dict(recipe)
        handles = {h.layer: h for h in self.adapter.ffns(self.model)}
        self._reset_peak()
        started = time.perf_counter()
        results: dict[int, Any] = {}
        timings: list[dict[str, Any]] = []
        fingerprints: dict[str, dict[str, int]] = {}
        probes: dict[str, Tensor] = {}
        load_total = compress_total = 0.0
        for layer in layers:
            t0 = time.perf_counter()
            stats = merged_layer(partials, layer, self.device)
            _sync(self.device)
            t1 = time.perf_counter()
            fingerprints[str(layer)] = stats_fingerprints(stats)
            probes.update({f"layer.{layer}.{k}": v for k, v in stats_probe(stats).items()})
            t2 = time.perf_counter()
            weights = self.adapter.weights(self.model, handles[layer])
            results[layer] = compress_layer(weights, stats, config, layer)
            _sync(self.device)
            t3 = time.perf_counter()
            del stats, weights
            load_total += t1 - t0
            compress_total += t3 - t2
            timings.append({"layer": layer, "load_s": t1 - t0, "compress_s": t3 - t2})
        compute_s = time.perf_counter() - started
        peak = self._peak_gib()
        target = Path(out)
        save_shard(
            results,
            target,
            recipe=config.to_dict(),
            meta={"seconds": compute_s, "device": self.device, "spec": asdict(self.spec)},
            overwrite=True,
        )
        save_file(probes, str(target.parent / f"{target.name}.probe.safetensors"))
        spec = read_shard_spec(target)
        seconds = time.perf_counter() - started
        del results
        self._free()
        return {
            "layers": layers,
            "seconds": seconds,
            "load_s": load_total,
            "compress_s": compress_total,
            "save_s": seconds - compute_s,
            "per_layer": timings,
            "weights_sha256": spec["weights_sha256"],
            "ranks": sorted({e["report"]["rank"] for e in spec["layers"].values()}),
            "bytes": sum(e["report"]["bytes"] for e in spec["layers"].values()),
            "dense_bytes": sum(e["report"]["dense_bytes"] for e in spec["layers"].values()),
            "stats_fingerprints": fingerprints,
            "peak_gpu_gib": peak,
            "pid": os.getpid(),
            "device": self.device,
        }


# ------------------------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class BenchConfig:
    """What one setting runs; everything that decides the results, and nothing about workers."""

    model: str = "llama2-7b"
    sequences: int = 128
    window: int = 2048
    units: int = 8
    ranges: int = 2
    shards: int = 4
    batch_size: int = 8
    heavy_ratio: float = 0.1
    # The FFN reduction that makes Llama-2-7B 43.1% smaller as a whole (bench/e2e.py, bench/ffn.py).
    ffn_reduction: float = 0.67
    hit_top_fraction: float = 0.01
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise FFSplitError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not 1 <= self.ranges <= self.units:
            raise FFSplitError(f"--ranges must be in 1..units ({self.units}), got {self.ranges}")
        if self.sequences % self.units:
            raise FFSplitError(
                f"--sequences ({self.sequences}) must be a multiple of --units ({self.units})"
            )

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def profile(self) -> dict[str, Any]:
        from ffsplit.config import ProfileConfig

        return ProfileConfig(
            tokens=self.sequences * self.window,
            window=self.window,
            batch_size=self.batch_size,
            hit_top_fraction=self.hit_top_fraction,
        ).to_dict()

    def recipe(self) -> dict[str, Any]:
        from ffsplit.config import ProfileConfig, Recipe

        return Recipe(
            method="lowrank",
            heavy_ratio=self.heavy_ratio,
            ffn_reduction=self.ffn_reduction,
            profile=ProfileConfig.from_dict(self.profile()),
        ).to_dict()


def even_split(count: int, parts: int) -> list[list[int]]:
    """0..count-1 in `parts` contiguous runs, as even as possible: tasks.compress.layer_shards'
    rule (that module imports Prefect, absent on the GPU machine; a test keeps the two equal)."""
    parts = min(parts, count)
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def unit_ranges(units: int, ranges: int) -> list[list[int]]:
    """Contiguous ranges of unit numbers, as even as possible (range i: [a_i, a_{i+1}))."""
    return even_split(units, ranges)


def load_calibration(path: Path, sequences: int, window: int) -> tuple[Tensor, dict[str, Any]]:
    """The carried calibration ids [sequences, window] and their record (corpus, split, sha256)."""
    from safetensors import safe_open

    from ffsplit.data.windows import token_ids_sha256

    if not path.is_file():
        raise FFSplitError(f"{path}: no calibration ids; run bench/multigpu.py --prepare first")
    with safe_open(str(path), framework="pt") as f:
        ids = f.get_tensor("input_ids")
        record = json.loads((f.metadata() or {}).get("calibration", "{}"))
    if ids.shape[0] < sequences or ids.shape[1] != window:
        raise FFSplitError(
            f"{path}: holds {list(ids.shape)} ids, need {sequences} windows of {window}"
        )
    ids = ids[:sequences].contiguous()
    record.update(sequences=sequences, tokens=ids.numel(), sha256=token_ids_sha256(ids))
    return ids, record


def prepare_calibration(path: Path, sequences: int, window: int, corpus: str = "wikipedia") -> dict:
    """Tokenize the packaged calibration split with SmolLM2's tokenizer (CPU machine)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ffsplit.data.windows import calibration_windows
    from ffsplit.models.registry import materialize

    tokenizer = AutoTokenizer.from_pretrained(
        str(materialize("smollm2-135m")), local_files_only=True
    )
    ids, ref = calibration_windows(tokenizer, corpus, sequences * window, window)
    record = {**ref.to_dict(), "tokenizer": "smollm2-135m", "vocab_size": len(tokenizer)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": ids.contiguous()}, str(path), metadata={"calibration": json.dumps(record)}
    )
    return record


def run_setting(
    config: BenchConfig,
    ids: Tensor,
    workers: int,
    gpus: bool,
    scratch: Path,
    work: Path,
    log: Callable[[str], None] = print,
    before_profile: Callable[[], None] | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Profile and compress once with `workers` actors (one GPU each when `gpus`), timed.

    Ray must be up. Shards go to work/shard-i; partials to scratch and are removed at the end.
    on_stage(record) runs after the profile stage (to save numbers early).
    """
    import ray
    from ray.util import ActorPool

    spec = config.spec
    remote = ray.remote(StageWorker)
    options = {"num_cpus": config.threads, "num_gpus": 1 if gpus else 0}
    record: dict[str, Any] = {"workers": workers, "gpus": workers if gpus else 0}
    started = time.perf_counter()
    profile = config.profile()
    actors = [remote.options(**options).remote(asdict(spec), profile) for _ in range(workers)]
    try:
        record["workers_info"] = ray.get([a.describe.remote() for a in actors])
        record["warm_s"] = time.perf_counter() - started
        prints = {w["model_fingerprint"] for w in record["workers_info"]}
        if len(prints) != 1:
            raise FFSplitError(f"workers built different models (fingerprints {sorted(prints)})")
        log(f"[{workers}] workers ready in {record['warm_s']:.1f} s: {record['workers_info']}")
        if before_profile is not None:
            before_profile()
        pool = ActorPool(actors)
        ranges = unit_ranges(config.units, config.ranges)
        partials = [str(scratch / f"partial-{i}") for i in range(len(ranges))]
        t = time.perf_counter()
        record["preallocate"] = ray.get(
            [a.preallocate.remote(partials[i :: len(actors)]) for i, a in enumerate(actors)]
        )
        record["preallocate_s"] = time.perf_counter() - t
        ids_ref = ray.put(ids)
        t0 = time.perf_counter()
        jobs = list(zip(ranges, partials, strict=True))
        record["profile_tasks"] = list(
            pool.map(
                lambda a, job: a.profile_range.remote(ids_ref, job[0], config.units, job[1]),
                jobs,
            )
        )
        record["profile_s"] = time.perf_counter() - t0
        tokens = sum(t["tokens"] for t in record["profile_tasks"])
        record["profile_tokens"] = tokens
        record["profile_tokens_per_s"] = tokens / record["profile_s"]
        log(f"[{workers}] profile {record['profile_s']:.1f} s, {tokens} tokens")
        if on_stage is not None:
            on_stage(record)
        shards = even_split(spec.layers, config.shards)
        outs = [str(work / f"shard-{i}") for i in range(len(shards))]
        recipe = config.recipe()
        t1 = time.perf_counter()
        record["compress_tasks"] = list(
            pool.map(
                lambda a, job: a.compress_shard.remote(job[0], partials, recipe, job[1]),
                list(zip(shards, outs, strict=True)),
            )
        )
        record["compress_s"] = time.perf_counter() - t1
        record["total_s"] = time.perf_counter() - started
        record["shards"] = outs
        log(f"[{workers}] compress {record['compress_s']:.1f} s, total {record['total_s']:.1f} s")
    finally:
        for actor in actors:
            ray.kill(actor)
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """How far two settings' results are apart: merged statistics and compressed weights."""
    from safetensors.torch import load_file

    def prints(rec: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for task in rec["compress_tasks"]:
            out.update(task["stats_fingerprints"])
        return out

    stats_bitwise = prints(first) == prints(second)
    probe_diff = 0.0
    weight_diff = 0.0
    weights_bitwise = True
    for a, b in zip(first["shards"], second["shards"], strict=True):
        pa = load_file(f"{a}.probe.safetensors")
        pb = load_file(f"{b}.probe.safetensors")
        if set(pa) != set(pb):
            raise FFSplitError(f"{a} and {b} probe different statistics")
        for key in pa:
            probe_diff = max(probe_diff, float((pa[key] - pb[key]).abs().max()))
    for ta, tb in zip(first["compress_tasks"], second["compress_tasks"], strict=True):
        if ta["weights_sha256"] != tb["weights_sha256"]:
            weights_bitwise = False
    if not weights_bitwise:  # the sha256 differ: measure by how much
        for a, b in zip(first["shards"], second["shards"], strict=True):
            wa = load_file(f"{a}/shard.safetensors")
            wb = load_file(f"{b}/shard.safetensors")
            for key in wa:
                if wa[key].is_floating_point():
                    diff = (wa[key].double() - wb[key].double()).abs().max()
                    weight_diff = max(weight_diff, float(diff))
                elif not torch.equal(wa[key], wb[key]):
                    weight_diff = math.inf  # different heavy sets or orders
    models = {w["model_fingerprint"] for w in first["workers_info"] + second["workers_info"]}
    return {
        "same_model_weights": len(models) == 1,
        "stats_bitwise_equal": stats_bitwise,
        "stats_max_abs_diff": probe_diff,
        "weights_bitwise_equal": weights_bitwise,
        "weights_max_abs_diff": weight_diff,
        "max_abs_diff_1v2": max(probe_diff, weight_diff),
    }


def _prefault(folder: Path, gib: float) -> threading.Thread:
    """Touch `gib` of RAM through a tmpfs file (then free it), in a thread.

    The GPU machine's RAM grows as it is first used (about 3 s per 8 GiB, KINDS.md); without this
    the first setting alone would pay that for its partials, which skews the comparison.
    """

    def run() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "prefault.bin"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, int(gib * 2**30))
            finally:
                os.close(fd)
        except OSError as exc:
            print(f"prefault skipped: {exc}", file=sys.stderr)
        finally:
            path.unlink(missing_ok=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _gpu_record() -> dict[str, Any]:
    import subprocess

    info: dict[str, Any] = {"torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["gpus"] = [line.strip() for line in names.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        info["gpus"] = []
    info["gpu_count"] = len(info["gpus"])
    info["cpu_count"] = os.cpu_count()
    info["python"] = sys.version.split()[0]
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return info


def run_benchmark(
    config: BenchConfig,
    settings: Sequence[int],
    *,
    gpus: bool,
    scratch: Path,
    work: Path,
    calibration: Path = CALIBRATION_FILE,
    json_path: Path | None = None,
    prefault_gib: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every setting (worker count) in turn, each in its own embedded Ray, then the comparison.

    With gpus, setting n runs Ray with n GPUs and n one-GPU workers; without, n one-CPU workers.
    The JSON is rewritten after each setting, so a run cut short still leaves its numbers.
    """
    import ray

    from tasks.runtime import ensure_ray

    ids, calib = load_calibration(calibration, config.sequences, config.window)
    result: dict[str, Any] = {
        "command": " ".join(["python3", "bench/multigpu.py", *sys.argv[1:]]),
        "machine": _gpu_record(),
        "model": {**asdict(config.spec), "parameters": None},
        "calibration": calib,
        "config": asdict(config),
        "units": unit_ranges(config.units, config.ranges),
        "recipe": config.recipe(),
        "settings": {},
    }
    spec = config.spec
    result["model"]["parameters"] = _parameter_count(spec)

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")

    prefault = _prefault(scratch / "prefault", prefault_gib) if prefault_gib > 0 else None

    def wait_prefault() -> None:
        if prefault is not None and prefault.is_alive():
            t = time.perf_counter()
            prefault.join()
            result["prefault_wait_s"] = time.perf_counter() - t

    started_here = False
    for workers in settings:
        key = f"{workers}{'gpu' if gpus else 'cpu'}"
        started_ray = False
        t = time.perf_counter()
        if gpus or not ray.is_initialized():
            started_ray = started_here = ensure_ray(
                num_cpus=max(os.cpu_count() or 1, workers * config.threads) if gpus else None,
                num_gpus=workers if gpus else None,
            )
        ray_start_s = time.perf_counter() - t
        try:
            record = run_setting(
                config,
                ids,
                workers,
                gpus,
                scratch / key,
                work / key,
                log=log,
                before_profile=wait_prefault,
                on_stage=lambda partial, key=key: (
                    result["settings"].__setitem__(key, {**partial, "unfinished": True}),
                    _summarise(result, gpus),
                    save(),
                ),
            )
        except Exception as exc:  # keep what ran; the next setting may still run
            record = {**result["settings"].get(key, {}), "error": f"{type(exc).__name__}: {exc}"}
            log(f"[{workers}] failed: {record['error']}")
        finally:
            if started_ray and gpus:
                ray.shutdown()
        record["ray_start_s"] = ray_start_s
        result["settings"][key] = record
        _summarise(result, gpus)
        save()
    if started_here and ray.is_initialized():
        ray.shutdown()
    keys = [k for k, v in result["settings"].items() if "error" not in v]
    if len(keys) >= 2:
        one = next((k for k in keys if k.startswith("1")), keys[0])
        other = next(k for k in keys if k != one)
        result["comparison"] = {
            "between": [one, other],
            **compare(result["settings"][one], result["settings"][other]),
        }
        result["max_abs_diff_1v2"] = result["comparison"]["max_abs_diff_1v2"]
        result["max_abs_diff_1v2_stats"] = result["comparison"]["stats_max_abs_diff"]
        result["max_abs_diff_1v2_weights"] = result["comparison"]["weights_max_abs_diff"]
        save()
    return result


def _parameter_count(spec: ModelSpec) -> int:
    d, m, n, v = spec.hidden, spec.intermediate, spec.layers, spec.vocab
    kv = d * spec.kv_heads // spec.heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * m + 2 * d
    return n * per_layer + 2 * v * d + d


def _summarise(result: dict[str, Any], gpus: bool) -> None:
    """The headline numbers (flat keys) from whatever settings have run."""
    unit = "gpu" if gpus else "cpu"
    for n in (1, 2):
        rec = result["settings"].get(f"{n}{unit}")
        if rec is None or "profile_tasks" not in rec:
            continue
        result[f"profile_tokens_per_s_{n}{unit}"] = rec["profile_tokens_per_s"]
        result[f"profile_s_{n}{unit}"] = rec["profile_s"]
        result[f"warm_s_{n}{unit}"] = rec["warm_s"]
        if "preallocate_s" in rec:
            result[f"preallocate_s_{n}{unit}"] = rec["preallocate_s"]
        busy: dict[int, float] = {}
        for task in rec["profile_tasks"]:
            busy[task["pid"]] = busy.get(task["pid"], 0.0) + task["forward_s"]
        # Forward passes alone (no hand-off writes): the slowest worker's sum.
        result[f"profile_forward_s_{n}{unit}"] = max(busy.values())
        result[f"profile_forward_tokens_per_s_{n}{unit}"] = rec["profile_tokens"] / max(
            busy.values()
        )
        if "compress_tasks" not in rec:
            continue
        result[f"compress_s_{n}{unit}"] = rec["compress_s"]
        result[f"total_s_{n}{unit}"] = rec["total_s"]
        peaks = [t["peak_gpu_gib"] for t in rec["profile_tasks"] + rec["compress_tasks"]]
        if all(p is not None for p in peaks):
            result[f"peak_gpu_gib_{n}{unit}"] = max(peaks)
    one, two = result["settings"].get(f"1{unit}"), result["settings"].get(f"2{unit}")
    if one and two and "profile_tasks" in one and "profile_tasks" in two:
        result["profile_scaling"] = two["profile_tokens_per_s"] / one["profile_tokens_per_s"]
        result["profile_forward_scaling"] = (
            result[f"profile_forward_tokens_per_s_2{unit}"]
            / result[f"profile_forward_tokens_per_s_1{unit}"]
        )
        if "compress_s" in one and "compress_s" in two:
            result["compress_scaling"] = one["compress_s"] / two["compress_s"]
            result["total_scaling"] = one["total_s"] / two["total_s"]


# ------------------------------------------------------------------------------ the CPU-side flow


def save_base_model(spec: ModelSpec, folder: Path) -> Path:
    """The spec's model, built on the CPU, as an HF folder with SmolLM2's tokenizer.

    It holds the same weights the CPU workers build (same seeds), so it is the base model the
    CPU-side flow assembles the job's shards into, evaluates and registers.
    """
    from transformers import AutoTokenizer

    from ffsplit.models.registry import materialize

    tokenizer = AutoTokenizer.from_pretrained(
        str(materialize("smollm2-135m")), local_files_only=True
    )
    if len(tokenizer) != spec.vocab:
        raise FFSplitError(
            f"model spec {spec.name}: vocabulary {spec.vocab} != the tokenizer's {len(tokenizer)}"
        )
    model = build_model(spec, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def finish_on_cpu(
    result: dict[str, Any],
    setting: str,
    base_folder: Path,
    out: Path,
    *,
    model_name: str,
    mlflow_uri: str | None = None,
    eval_tokens: int = 1024,
    eval_window: int = 128,
) -> dict[str, Any]:
    """The CPU-side flow's stages on one setting's shards: assemble, evaluate, register.

    Uses the pipeline's own Ray task bodies (tasks.assemble, tasks.evaluate) and registry
    (tracking.registry), which need Prefect and MLflow: this runs where they are installed, with Ray
    up. `base_folder` is save_base_model's folder for the same spec.
    """
    from ffsplit.models.registry import resolve_model
    from tasks.assemble import run_assemble
    from tasks.evaluate import eval_params, metrics, run_evaluate
    from tracking.registry import register_variant

    record = result["settings"][setting]
    sha = resolve_model(str(base_folder)).weights_sha256
    variant = out / "variant"
    extra = {
        "multigpu": {
            "setting": setting,
            "workers": record["workers"],
            "profile_s": record["profile_s"],
            "compress_s": record["compress_s"],
        }
    }
    assembled = run_assemble(
        str(base_folder),
        sha,
        result["recipe"],
        record["shards"],
        str(variant),
        calibration=result["calibration"],
        extra=extra,
    )
    evaluation = run_evaluate(
        str(variant),
        eval_params(max_tokens=eval_tokens, window=eval_window, latency=False),
        str(out / "evaluation.json"),
    )
    numbers = metrics(evaluation)
    registered = register_variant(
        variant,
        model_name=model_name,
        metrics=numbers,
        uri=mlflow_uri,
        tags={"ffsplit.bench": "multigpu", "ffsplit.setting": setting},
    )
    return {
        "variant": assembled,
        "metrics": numbers,
        "registered": {
            "name": registered.name,
            "version": registered.version,
            "uri": registered.uri,
        },
    }


# --------------------------------------------------------------------------------------- the chart


def plot(json_path: Path, out: Path) -> Path:
    """Bar chart: stage seconds (warm-up, profile, compress) for 1 and 2 workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    keys = sorted(data["settings"], key=lambda k: int(k[0]))
    stages = (
        ("warm_s", "workers start, build the model"),
        ("preallocate_s", "allocate hand-off files"),
        ("profile_s", "profile"),
        ("compress_s", "compress"),
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bottom = [0.0] * len(keys)
    for stage, label in stages:
        values = [data["settings"][k].get(stage, 0.0) for k in keys]
        ax.bar(keys, values, bottom=bottom, label=label, width=0.5)
        for i, (b, v) in enumerate(zip(bottom, values, strict=True)):
            ax.text(i, b + v / 2, f"{v:.0f} s", ha="center", va="center", fontsize=9)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    model = data["model"]["name"]
    tokens = data["calibration"]["tokens"]
    title = f"{model} (random weights): profile {tokens} tokens + compress all layers"
    if "profile_scaling" in data:
        title += f"\nprofile {data['profile_scaling']:.2f}x, total {data['total_scaling']:.2f}x"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("seconds (wall, Ray tasks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    parser.add_argument("--settings", default="2,1", help="worker counts, run in this order")
    parser.add_argument("--cpu", action="store_true", help="CPU workers (no GPUs asked for)")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--ranges", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ffsplit-multigpu/scratch"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ffsplit-multigpu/work"))
    parser.add_argument("--calibration", type=Path, default=CALIBRATION_FILE)
    parser.add_argument("--prefault-gib", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prepare", action="store_true", help="write the calibration ids, exit")
    parser.add_argument("--plot", type=Path, default=None, help="chart of a result JSON, exit")
    args = parser.parse_args(argv)
    if args.plot is not None:
        print(plot(args.plot, args.plot.with_suffix(".png")))
        return
    if args.prepare:
        print(json.dumps(prepare_calibration(args.calibration, args.sequences, args.window)))
        return
    config = BenchConfig(
        model=args.model,
        sequences=args.sequences,
        window=args.window,
        units=args.units,
        ranges=args.ranges,
        shards=args.shards,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    settings = [int(s) for s in args.settings.split(",") if s]
    shutil.rmtree(args.work, ignore_errors=True)
    result = run_benchmark(
        config,
        settings,
        gpus=not args.cpu,
        scratch=args.scratch,
        work=args.work,
        calibration=args.calibration,
        json_path=args.json,
        prefault_gib=args.prefault_gib,
        log=lambda line: print(line, flush=True),
    )
    headline = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    print(json.dumps(headline, indent=1))


def cli() -> int:
    try:
        main()
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run through the importable module, so Ray workers import bench.multigpu by reference.
    from bench import multigpu

    sys.exit(multigpu.cli())
