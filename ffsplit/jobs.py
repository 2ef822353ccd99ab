"""The library's jobs, path in and path out: profile, compress, evaluate.

These are what the CLI commands and the pipeline's tasks call, so that `ffsplit compress ...` and a
Prefect/Ray run do the same work (and the pipeline's overhead can be measured against them).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffsplit.adapters import Adapter, get_adapter
from ffsplit.compress.recipe import compress_model
from ffsplit.config import (
    DEFAULT_CORPUS,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_WINDOW,
    HealConfig,
    ProfileConfig,
    Recipe,
)
from ffsplit.errors import FFSplitError
from ffsplit.profiling import ModelStats, load_stats, profile_model, save_stats
from ffsplit.split import ffn_modules
from ffsplit.variant import load_variant, save_variant
from ffsplit.variant.manifest import MANIFEST, WEIGHTS

Progress = Callable[[str, int, int], None]


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def is_variant(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_any(
    model_or_dir: str | Path, device: str = "cpu"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A base model (packaged name or HF folder) or a variant folder, with a description."""
    if is_variant(model_or_dir):
        model, tokenizer, manifest = load_variant(model_or_dir, device=device)
        return (
            model,
            tokenizer,
            {"kind": "variant", "path": str(model_or_dir), "manifest": manifest},
        )
    from ffsplit.models.loading import load_model

    model, tokenizer, ref = load_model(str(model_or_dir), device=device)
    return model, tokenizer, {"kind": "base", "base_model": ref.to_dict()}


def _adapter_of(net: nn.Module, model: str | Path) -> Adapter:
    """The model's adapter; an unsupported architecture names the model it came from."""
    try:
        return get_adapter(net)
    except FFSplitError as exc:
        raise FFSplitError(f"{model}: {exc}") from None


def _require_tokenizer(tokenizer: Any, model: str | Path, why: str) -> None:
    if tokenizer is None:
        raise FFSplitError(f"{model}: no tokenizer files; {why}")


def _check_stats_fit(stats: ModelStats, net: nn.Module, adapter: Adapter, path: str | Path) -> None:
    """Statistics must cover every FFN of this model, neuron for neuron."""
    for handle in adapter.ffns(net):
        layer = stats.layers.get(handle.layer)
        if layer is None:
            raise FFSplitError(
                f"{path}: no statistics for layer {handle.layer} (the file covers layers "
                f"{sorted(stats.layers)}); profile every layer of the model"
            )
        neurons = adapter.weights(net, handle).neurons
        if layer.neurons != neurons:
            raise FFSplitError(
                f"{path}: layer {handle.layer} has statistics for {layer.neurons} neurons, the "
                f"model's FFN has {neurons}; they were collected on another model"
            )


def calibration_data(
    tokenizer: Any, config: ProfileConfig, shard: tuple[int, int] | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows (optionally one shard of them: windows i, i+n, i+2n, ...)."""
    from ffsplit.data.windows import calibration_windows

    windows, ref = calibration_windows(tokenizer, config.corpus, config.tokens, config.window)
    info = ref.to_dict()
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise FFSplitError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        windows = windows[index::count]
        info["shard"] = [index, count]
    return windows, info


def profile_job(
    model: str | Path,
    config: ProfileConfig,
    out: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    layers: list[int] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Profile a base model on calibration text and write a statistics file."""
    started = time.perf_counter()
    net, tokenizer, info = load_any(model, device=device)
    if info["kind"] != "base":
        raise FFSplitError(f"{model}: profile a base model, not a compressed variant")
    _adapter_of(net, model)
    _require_tokenizer(tokenizer, model, "profiling needs it to tokenize calibration text")
    windows, calibration = calibration_data(tokenizer, config, shard)
    if windows.shape[0] == 0:
        raise FFSplitError(f"shard {shard} holds no calibration windows; use fewer shards")
    meta = {
        "base_model": info["base_model"],
        "model_sha256": info["base_model"]["weights_sha256"],
        "calibration": calibration,
    }
    stats = profile_model(
        net, windows, config, layers=layers, progress=_stage(progress, "profile"), meta=meta
    )
    path = save_stats(stats, out)
    return {
        "path": str(path),
        "tokens": int(windows.numel()),
        "layers": len(stats.layers),
        "seconds": time.perf_counter() - started,
        "profile_seconds": stats.meta["seconds"],
    }


def compress_job(
    model: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    stats_path: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress a base model by a recipe and write a variant folder.

    Statistics come from stats_path, or are profiled here (recipe.profile) when the recipe needs
    them and none were given.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FFSplitError(f"output folder {out} already exists; choose another --out or remove it")
    # A damaged statistics file fails before the (slow) model load.
    stats: ModelStats | None = None if stats_path is None else load_stats(stats_path)
    net, tokenizer, info = load_any(model, device=device)
    if info["kind"] != "base":
        raise FFSplitError(f"{model}: compress a base model, not an already compressed variant")
    base = info["base_model"]
    adapter = _adapter_of(net, model)
    calibration = None
    profile_seconds = 0.0
    if stats is not None:
        if stats.meta.get("model_sha256") not in (None, base["weights_sha256"]):
            raise FFSplitError(
                f"{stats_path}: statistics were collected on another model "
                f"(sha256 {str(stats.meta.get('model_sha256'))[:12]}..., this model "
                f"{base['weights_sha256'][:12]}...)"
            )
        _check_stats_fit(stats, net, adapter, str(stats_path))
        calibration = stats.meta.get("calibration")
    elif recipe.needs_statistics:
        _require_tokenizer(
            tokenizer, model, "this recipe profiles calibration text: add them or pass statistics"
        )
        windows, calibration = calibration_data(tokenizer, recipe.profile)
        stats = profile_model(
            net,
            windows,
            recipe.profile,
            progress=_stage(progress, "profile"),
            meta={"model_sha256": base["weights_sha256"]},
        )
        profile_seconds = stats.meta["seconds"]
    if recipe.heal.enabled:
        _require_tokenizer(tokenizer, model, "healing distills on calibration text")
        dense = copy.deepcopy(net)  # the teacher: the base model as it was before compression
    report, layers = compress_model(
        net, stats, recipe, adapter=adapter, progress=_stage(progress, "compress")
    )
    extra: dict[str, Any] = {"profile_seconds": profile_seconds}
    if recipe.heal.enabled:
        extra["heal"] = heal_model(dense, net, tokenizer, recipe.heal, adapter, progress)
        del dense
    save_variant(
        net,
        tokenizer,
        out,
        adapter=adapter,
        base_model=base,
        report=report,
        layers=layers,
        calibration=calibration,
        extra=extra,
        overwrite=overwrite,
    )
    result = {
        "path": str(out),
        "label": recipe.label,
        "ffn_reduction": report.ffn_reduction,
        "dense_ffn_bytes": report.dense_ffn_bytes,
        "ffn_bytes": report.ffn_bytes,
        "profile_seconds": profile_seconds,
        "compress_seconds": report.seconds,
        "seconds": time.perf_counter() - started,
    }
    if recipe.heal.enabled:
        result.update(_heal_summary(extra["heal"]))
    return result


def heal_model(
    dense: nn.Module,
    student: nn.Module,
    tokenizer: Any,
    config: HealConfig,
    adapter: Adapter,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Heal a compressed model in place on the heal config's calibration windows; the manifest's
    'heal' entry (report plus the record of the text it saw)."""
    from ffsplit.data.windows import calibration_windows
    from ffsplit.heal import heal

    windows, ref = calibration_windows(tokenizer, config.corpus, config.tokens, config.window)
    report = heal(
        dense, student, windows, config, adapter=adapter, progress=_stage(progress, "heal")
    )
    return {**report.to_dict(), "calibration": ref.to_dict()}


def _heal_summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "heal_seconds": entry["seconds"],
        "heal_loss_before": entry["before"],
        "heal_loss_after": entry["after"],
    }


# Keys new_manifest / save_variant write themselves; the rest of a manifest is 'extra' that a
# re-saved (healed) variant carries over.
_MANIFEST_OWN_KEYS = frozenset(
    {
        "format",
        "format_version",
        "ffsplit_version",
        "git_commit",
        "created",
        "base_model",
        "adapter",
        "architecture",
        "recipe",
        "calibration",
        "storage_dtype",
        "tied",
        "layers",
        "sizes",
        "compression_seconds",
        "files",
    }
)


def _compressed_layers(
    folder: Path, manifest: dict[str, Any], net: nn.Module, adapter: Adapter
) -> dict[int, Any]:
    """The per-layer compression results of a saved variant (heavy sets, neuron orders, reports,
    the modules now in `net`), as save_variant takes them."""
    from safetensors.torch import load_file

    from ffsplit.compress.results import CompressedLayer, LayerReport
    from ffsplit.variant.manifest import NEURONS

    neurons = load_file(str(folder / NEURONS)) if (folder / NEURONS).is_file() else {}
    layers: dict[int, Any] = {}
    for handle in adapter.ffns(net):
        entry = manifest["layers"].get(str(handle.layer), {})
        heavy = neurons.get(f"layer.{handle.layer}.heavy")
        order = neurons.get(f"layer.{handle.layer}.order")
        if heavy is None or order is None or "report" not in entry:
            raise FFSplitError(
                f"{folder}: layer {handle.layer} has no compression record (neurons and report); "
                "heal a variant written by ffsplit compress"
            )
        fields = dict(entry["report"])
        if fields.get("bits") is not None:
            fields["bits"] = {int(k): v for k, v in fields["bits"].items()}
        try:
            report = LayerReport(**fields)
        except TypeError as exc:
            raise FFSplitError(
                f"{folder}: layer {handle.layer} report is malformed ({exc})"
            ) from None
        modules = (
            net.get_submodule(handle.up_path),
            None if handle.gate_path is None else net.get_submodule(handle.gate_path),
            net.get_submodule(handle.down_path),
        )
        layers[handle.layer] = CompressedLayer(handle.layer, modules, heavy, order, report)
    return layers


def heal_job(
    variant: str | Path,
    config: HealConfig,
    out: str | Path,
    *,
    dense: tuple[nn.Module, str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Heal a saved (unhealed) variant against its base model and write a new variant folder.

    The new manifest's recipe carries the heal config and its 'heal' entry the report; the
    structure, sizes and heavy sets are those of the input variant. dense: (base model, its
    weights sha256) already loaded (read only; the hash is checked against the manifest), else
    the base model is loaded here.
    """
    from ffsplit.compress.results import CompressionReport
    from ffsplit.models.loading import load_model

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FFSplitError(f"output folder {out} already exists; choose another --out or remove it")
    if not config.enabled:
        raise FFSplitError("heal.steps is 0: healing is off, nothing to write")
    folder = Path(variant)
    if not is_variant(folder):
        raise FFSplitError(f"{folder}: not an ffsplit variant (no {MANIFEST}); compress first")
    net, tokenizer, manifest = load_variant(folder, device=device)
    _require_tokenizer(tokenizer, folder, "healing distills on calibration text")
    recipe = Recipe.from_dict(manifest["recipe"], where=f"{folder / MANIFEST}: recipe")
    if recipe.heal.enabled:
        raise FFSplitError(f"{folder}: this variant is already healed ({recipe.label})")
    try:
        healed = recipe.replace(heal=config)
    except FFSplitError as exc:
        raise FFSplitError(f"{folder}: {exc}") from None
    base = manifest["base_model"]
    expected = base.get("weights_sha256")
    if dense is None:
        teacher, _, ref = load_model(base.get("path") or base["name"], device=device)
        actual = ref.weights_sha256
    else:
        teacher, actual = dense
    if expected and actual != expected:
        raise FFSplitError(
            f"base model weights (sha256 {str(actual)[:12]}...) are not the ones {folder} was made "
            f"from ({str(expected)[:12]}...)"
        )
    adapter = _adapter_of(net, folder)
    layers = _compressed_layers(folder, manifest, net, adapter)
    entry = heal_model(teacher, net, tokenizer, config, adapter, progress)
    reports = [layers[i].report for i in sorted(layers)]
    seconds = float(manifest.get("compression_seconds") or 0.0)
    report = CompressionReport.of(healed.to_dict(), reports, seconds)
    extra = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN_KEYS}
    extra["heal"] = {
        **entry,
        "from_variant": {"path": str(folder), "weights_sha256": manifest["files"].get(WEIGHTS)},
    }
    save_variant(
        net,
        tokenizer,
        out,
        adapter=adapter,
        base_model=base,
        report=report,
        layers=layers,
        calibration=manifest.get("calibration"),
        extra=extra,
        overwrite=overwrite,
    )
    return {
        "path": str(out),
        "label": healed.label,
        "ffn_reduction": report.ffn_reduction,
        "dense_ffn_bytes": report.dense_ffn_bytes,
        "ffn_bytes": report.ffn_bytes,
        **_heal_summary(entry),
        "seconds": time.perf_counter() - started,
    }


def size_of(model: nn.Module) -> dict[str, Any]:
    from ffsplit.eval import model_size

    return model_size(model, ffn_modules(model, get_adapter(model))).to_dict()


def evaluate_job(
    model_or_dir: str | Path,
    *,
    text: str | Path | None = None,
    corpus: str = DEFAULT_CORPUS,
    max_tokens: int = DEFAULT_EVAL_TOKENS,
    window: int = DEFAULT_WINDOW,
    latency: bool = False,
    latency_workload: dict[str, int] | None = None,
    probe_limit: int = 1500,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quality (perplexity, or probe accuracy for encoders), size, and optionally latency.

    Perplexity uses the evaluation split of a packaged corpus (disjoint from calibration), or the
    whole of a local text file. Latency races the variant against its base model in one run, on
    the model already loaded for quality; latency_workload overrides latency_against_base's
    prompt_tokens / decode_tokens / repeats.
    """
    from ffsplit.models.loading import is_causal_lm

    net, tokenizer, info = load_any(model_or_dir, device=device)
    if tokenizer is None:
        raise FFSplitError(f"{model_or_dir}: no tokenizer files; cannot evaluate on text")
    result: dict[str, Any] = {"model": str(model_or_dir), "kind": info["kind"]}
    if info["kind"] == "variant":
        manifest = info["manifest"]
        result["base_model"] = manifest["base_model"]
        result["recipe"] = manifest["recipe"]
        result["ffn_reduction"] = manifest["sizes"]["ffn_reduction"]
    else:
        result["base_model"] = info["base_model"]
        result["ffn_reduction"] = 0.0
    result["size"] = size_of(net)
    if is_causal_lm(net.config):
        from ffsplit.data.windows import corpus_windows
        from ffsplit.eval import perplexity

        source = text if text is not None else corpus
        split = "all" if text is not None else "evaluation"
        windows, ref = corpus_windows(tokenizer, source, split, max_tokens, window)
        ppl = perplexity(net, windows, progress=_stage(progress, "perplexity"))
        result["perplexity"] = ppl.perplexity
        result["eval"] = {**ref.to_dict(), **ppl.to_dict()}
        if not math.isfinite(ppl.perplexity):
            raise FFSplitError(f"{model_or_dir}: perplexity is not finite")
    else:
        from ffsplit.data.corpora import labelled_texts
        from ffsplit.eval import probe_accuracy

        train = labelled_texts("tweets", "calibration", limit=probe_limit)
        test = labelled_texts("tweets", "evaluation", limit=probe_limit)
        probe = probe_accuracy(net, tokenizer, train[0], train[1], test[0], test[1])
        result["accuracy"] = probe.accuracy
        result["eval"] = {
            "corpus": "tweets",
            "train": len(train[0]),
            "test": len(test[0]),
            **probe.to_dict(),
        }
    if latency:
        result["latency"] = latency_against_base(
            net, result["base_model"], info["kind"], device, **(latency_workload or {})
        )
    return result


def latency_against_base(
    net: nn.Module,
    base_model: dict[str, Any],
    kind: str,
    device: str = "cpu",
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 5,
) -> dict[str, Any]:
    """Prefill and decode latency of the dense base and this model, interleaved in one run."""
    from ffsplit.eval import measure_latency, speedups
    from ffsplit.models.loading import is_causal_lm, load_model

    models = {"dense": net} if kind == "base" else {}
    if kind != "base":
        base, _, ref = load_model(base_model.get("path") or base_model["name"], device=device)
        expected = base_model.get("weights_sha256")
        if expected and ref.weights_sha256 != expected:
            raise FFSplitError(
                f"{ref.path}: base model weights (sha256 {ref.weights_sha256[:12]}...) are not "
                f"the ones this variant was made from ({str(expected)[:12]}...)"
            )
        models = {"dense": base, "variant": net}
    decode = decode_tokens if is_causal_lm(net.config) else 0
    results = measure_latency(models, prompt_tokens, decode, repeats=repeats)
    out: dict[str, Any] = {name: r.to_dict() for name, r in results.items()}
    if "variant" in results:
        out["speedup"] = speedups(results, reference="dense")["variant"]
    out["workload"] = {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode,
        "repeats": repeats,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    return out


# ------------------------------------------------------------------------------------ observation

OBSERVATION_HEAVY_RATIO = 0.01  # issue 6: the heavy set of the observation and the ablation: top 1%
OBSERVATION_STABILITY_RATIOS = (0.01, 0.05, 0.10)  # method.md: stability of the top 1/5/10%
OBSERVATION_CORPORA = ("wikipedia", "news")  # heavy sets from A, stability and coverage on B


def observation_params(
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 4,
    probe_limit: int = 1500,
    random_repeats: int = 3,
    seed: int = 0,
) -> dict[str, int]:
    """The observation's settings, checked (so a flow can refuse bad ones before any work)."""
    checks = (
        ("calib_tokens", calib_tokens, 2),
        ("eval_tokens", eval_tokens, 2),
        ("window", window, 2),
        ("batch_size", batch_size, 1),
        ("probe_limit", probe_limit, 3),  # the probe's tweets are balanced over 3 labels
        ("random_repeats", random_repeats, 1),
        ("seed", seed, 0),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FFSplitError(f"observation: {name} must be an integer >= {low}, got {value!r}")
    for name, value in (("calib_tokens", calib_tokens), ("eval_tokens", eval_tokens)):
        if value < window:
            raise FFSplitError(
                f"observation: {name} ({value}) must be at least one window ({window})"
            )
    return {
        "calib_tokens": calib_tokens,
        "eval_tokens": eval_tokens,
        "window": window,
        "batch_size": batch_size,
        "probe_limit": probe_limit,
        "random_repeats": random_repeats,
        "seed": seed,
    }


# The defaults of every observation setting, by name (for command lines built over the job).
OBSERVATION_DEFAULTS: dict[str, int] = observation_params()
OBSERVATION_HELP = {"probe_limit": "tweets per probe split"}


def run_environment(device: str = "cpu") -> dict[str, Any]:
    """What ran a job: host, Python, torch/transformers, device and threads, git commit, date."""
    import os
    import platform
    import socket
    import subprocess
    from datetime import UTC, datetime

    import transformers

    from ffsplit.variant.manifest import git_commit

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    if info["commit"]:
        try:
            status = subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            )
            info["worktree_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    info["date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    return info


def observation_job(
    model: str | Path,
    *,
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 4,
    probe_limit: int = 1500,
    random_repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
    command: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The paper's premise on one base model (issue 6), as one JSON-ready record.

    Profiles the Wikipedia and the news calibration splits (same token count, no Gram matrices),
    counts per-token coverage of the Wikipedia heavy set while profiling news, then zeroes the top
    1% of neurons by score against random and bottom 1% sets: perplexity on the Wikipedia
    evaluation split (causal LMs) or linear-probe accuracy on tweets (encoders, plus the relative
    error of the last hidden states on the Wikipedia evaluation split). The record's keys are those
    reports.observation_plots draws and tasks.observation logs; progress(stage, done, total).
    """
    from ffsplit.analysis import (
        ablation,
        count_coverage,
        coverage_summary,
        heavy_set_stability,
        heavy_sets,
        hidden_state_error,
        model_observation,
    )
    from ffsplit.data.corpora import TWEET_LABELS, labelled_texts
    from ffsplit.data.windows import calibration_windows, corpus_windows, evaluation_windows
    from ffsplit.eval import perplexity, probe_accuracy
    from ffsplit.models.loading import is_causal_lm, load_model

    params = observation_params(
        calib_tokens, eval_tokens, window, batch_size, probe_limit, random_repeats, seed
    )
    corpus_a, corpus_b = OBSERVATION_CORPORA
    ratio = OBSERVATION_HEAVY_RATIO
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    net, tokenizer, ref = load_model(str(model), device=device)
    adapter = _adapter_of(net, model)
    _require_tokenizer(tokenizer, model, "the observation profiles and evaluates on text")
    causal = is_causal_lm(net.config)
    seconds["load"] = time.perf_counter() - started

    config = ProfileConfig(
        corpus=corpus_a,
        tokens=calib_tokens,
        window=window,
        batch_size=batch_size,
        collect_grams=False,  # the observation needs no Gram matrices (and they cost a lot on CPU)
    )
    calib, calib_ref = calibration_windows(tokenizer, corpus_a, calib_tokens, window)
    other, other_ref = corpus_windows(tokenizer, corpus_b, "calibration", calib_tokens, window)

    # Seeded here for reproducible random sets and probes, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        stats_a = profile_model(
            net, calib, config, adapter=adapter, progress=_stage(progress, f"profile {corpus_a}")
        )
        seconds[f"profile_{corpus_a}"] = time.perf_counter() - t0
        downs = {h.layer: adapter.weights(net, h).down for h in adapter.ffns(net)}
        heavy = heavy_sets(stats_a, downs, ratio)
        top_k = {i: s.hit_top_k for i, s in stats_a.layers.items()}
        t0 = time.perf_counter()
        with count_coverage(net, adapter, heavy, top_k) as counts:
            stats_b = profile_model(
                net,
                other,
                config.replace(corpus=corpus_b),
                adapter=adapter,
                progress=_stage(progress, f"profile {corpus_b}"),
            )
        seconds[f"profile_{corpus_b}"] = time.perf_counter() - t0

        record: dict[str, Any] = {
            "command": command or f"ffsplit.jobs.observation_job({str(model)!r}, **{params})",
            "machine": run_environment(device),
            "model": ref.to_dict(),
            "adapter": adapter.name,
            "profile": config.to_dict(),
            "data": {"calibration": calib_ref.to_dict(), "other_corpus": other_ref.to_dict()},
            "corpora": {"a": corpus_a, "b": corpus_b},
            "heavy_ratio": ratio,
            "observation": model_observation(stats_a, downs, ratio),
            "observation_other_corpus": model_observation(stats_b, downs, ratio),
            "stability": {
                f"{round(100 * r)}%": heavy_set_stability(stats_a, stats_b, downs, r)
                for r in OBSERVATION_STABILITY_RATIOS
            },
            "coverage": {
                "corpus": corpus_b,
                "heavy_from": corpus_a,
                "heavy_ratio": ratio,
                **coverage_summary(counts),
            },
        }

        t0 = time.perf_counter()
        # dense, top, bottom and one per random set: each evaluation is one progress step
        steps = {"done": 0, "total": 3 + random_repeats}

        def counted(evaluate: Callable[[nn.Module], float], stage: str) -> Any:
            def run(candidate: nn.Module) -> float:
                value = evaluate(candidate)
                steps["done"] += 1
                if progress is not None:
                    progress(stage, steps["done"], steps["total"])
                return value

            return run

        if causal:
            windows, eval_ref = evaluation_windows(tokenizer, corpus_a, eval_tokens, window)
            record["data"]["evaluation"] = eval_ref.to_dict()

            def quality(candidate: nn.Module) -> float:
                return perplexity(candidate, windows, batch_size=batch_size).perplexity

            metric, higher = f"perplexity ({corpus_a} evaluation split)", False
        else:
            train = labelled_texts("tweets", "calibration", limit=probe_limit, seed=seed)
            test = labelled_texts("tweets", "evaluation", limit=probe_limit, seed=seed)
            record["data"]["probe"] = {
                "corpus": "tweets",
                "train_split": "calibration",
                "test_split": "evaluation",
                "per_split": probe_limit,
                "balanced": True,
                "labels": list(TWEET_LABELS),
            }

            def quality(candidate: nn.Module) -> float:
                return probe_accuracy(candidate, tokenizer, *train, *test, seed=seed).accuracy

            metric, higher = f"linear-probe accuracy (tweets, {len(TWEET_LABELS)} classes)", True
        common = {"fraction": ratio, "seed": seed, "random_repeats": random_repeats}
        record["ablation"] = ablation(
            net,
            adapter,
            stats_a,
            counted(quality, "ablation"),
            metric=metric,
            higher_is_better=higher,
            **common,
        )
        if not causal:
            record["ablation"]["chance"] = 1 / len(TWEET_LABELS)
            # The probe refits on the ablated features, which hides much of the damage: the
            # relative error of the encoder's output itself is the sensitive measure.
            windows, eval_ref = evaluation_windows(tokenizer, corpus_a, eval_tokens, window)
            record["data"]["evaluation"] = eval_ref.to_dict()
            steps["done"] = 0
            record["ablation_hidden"] = ablation(
                net,
                adapter,
                stats_a,
                counted(hidden_state_error(net, windows, batch_size), "ablation hidden"),
                metric=f"relative error of the last hidden states vs dense ({corpus_a} evaluation)",
                higher_is_better=False,
                **common,
            )
    seconds["ablation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    record["seconds"] = seconds
    return record
