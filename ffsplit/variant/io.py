"""Save and load compressed variants: a self-describing folder, safetensors and JSON only.

load_variant rebuilds the base architecture from config.json, swaps split modules built from the
manifest's part specs, then loads weights whose sha256 the manifest vouches for. No pickle, no
remote code; a folder is written atomically, so a crash never leaves a half-written variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNWeights, adapter_by_name, architecture_of
from ffsplit.compress.results import CompressedLayer, CompressionReport
from ffsplit.errors import FFSplitError
from ffsplit.files import atomic_dir, sha256_file
from ffsplit.models.loading import all_finite
from ffsplit.split.apply import swap_ffn
from ffsplit.split.parts import build_part
from ffsplit.variant.manifest import MANIFEST, NEURONS, WEIGHTS, new_manifest, read_manifest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def _storage_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """State dict without tied duplicates; float32 stored as bf16 when that is lossless."""
    state = model.state_dict()
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    floats = [t for t in tensors.values() if t.dtype in (torch.float32, torch.float64)]
    lossless = all(torch.equal(t.to(torch.bfloat16).to(t.dtype), t) for t in floats)
    dtype = "bfloat16" if lossless else "float32"
    for name, t in tensors.items():
        if t.dtype in (torch.float32, torch.float64):
            tensors[name] = t.to(getattr(torch, dtype))
    return tensors, tied, dtype


def save_variant(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    adapter: Adapter,
    base_model: dict[str, Any],
    report: CompressionReport,
    layers: dict[int, CompressedLayer],
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a variant folder atomically; returns its path."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FFSplitError(f"output folder {out} already exists; choose another --out or remove it")
    tensors, tied, dtype = _storage_state(model)
    layer_entries: dict[str, Any] = {}
    neuron_tensors: dict[str, Tensor] = {}
    for handle in adapter.ffns(model):
        entry: dict[str, Any] = {
            "up": model.get_submodule(handle.up_path).spec(),
            "down": model.get_submodule(handle.down_path).spec(),
        }
        if handle.gate_path:
            entry["gate"] = model.get_submodule(handle.gate_path).spec()
        result = layers.get(handle.layer)
        if result is not None:
            entry["heavy"] = sorted(result.heavy_neurons.tolist())
            entry["report"] = {k: v for k, v in vars(result.report).items()}
            neuron_tensors[f"layer.{handle.layer}.heavy"] = result.heavy_neurons.contiguous()
            neuron_tensors[f"layer.{handle.layer}.order"] = result.order.contiguous()
        layer_entries[str(handle.layer)] = entry
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if neuron_tensors:
            save_file(neuron_tensors, str(tmp / NEURONS))
        model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = new_manifest(
            base_model=base_model,
            adapter=adapter.name,
            architecture=architecture_of(model),
            recipe=report.recipe,
            calibration=calibration,
            storage_dtype=dtype,
            tied=tied,
            layers=layer_entries,
            sizes={
                "dense_ffn_bytes": report.dense_ffn_bytes,
                "ffn_bytes": report.ffn_bytes,
                "ffn_reduction": report.ffn_reduction,
            },
            compression_seconds=report.seconds,
            files=files,
            **(extra or {}),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return out


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists and has its recorded sha256."""
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise FFSplitError(f"{path}: missing (listed in {folder / MANIFEST})")
        actual = sha256_file(path)
        if actual != digest:
            raise FFSplitError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest ({str(digest)[:12]}...): "
                "the file is corrupt, truncated or was changed"
            )


def _build_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ffsplit.models.loading import is_causal_lm

    try:
        config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise FFSplitError(f"{folder / 'config.json'}: unreadable model config ({exc})") from None
    model_class = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    return model_class.from_config(config, dtype=dtype)


def _check_specs(entry: dict[str, Any], dense: FFNWeights, where: str) -> None:
    """Part specs must fit the FFN (m neurons, hidden size d) before anything is allocated, so a
    damaged or hostile manifest cannot ask for absurd sizes."""
    m, d = dense.up.shape
    projections = [("up", True), ("down", False)] + ([("gate", True)] if "gate" in entry else [])
    if dense.gate is not None and "gate" not in entry:
        raise FFSplitError(f"{where}: the FFN is gated but the manifest has no gate spec")
    for name, outward in projections:
        spec = entry.get(name)
        parts = spec.get("parts") if isinstance(spec, dict) else None
        if not isinstance(parts, list) or not parts:
            raise FFSplitError(f"{where}: {name} spec has no list of parts")
        neurons = 0
        for part in parts:
            if not isinstance(part, dict):
                raise FFSplitError(f"{where}: {name} part {part!r} is not an object")
            size_in, size_out, rank = part.get("in"), part.get("out"), part.get("rank", 1)
            for value in (size_in, size_out, rank):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise FFSplitError(f"{where}: {name} part sizes must be positive integers")
            hidden, count = (size_in, size_out) if outward else (size_out, size_in)
            neurons += count
            if hidden != d or neurons > m or rank > min(size_in, size_out):
                raise FFSplitError(
                    f"{where}: {name} part {size_out}x{size_in} (rank {rank}) does not fit the "
                    f"FFN ({m} neurons, hidden size {d})"
                )


def load_variant(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
    fast: bool = True,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer or None, manifest) of a variant folder, ready for inference.

    On CUDA with fast=True the split FFNs switch to the fused GPU execution path when available.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    try:
        adapter = adapter_by_name(manifest["adapter"])
    except FFSplitError as exc:
        raise FFSplitError(f"{folder / MANIFEST}: {exc}") from None
    model = _build_model(folder, dtype)
    if architecture_of(model) != manifest["architecture"]:
        raise FFSplitError(
            f"{folder / MANIFEST}: architecture {manifest['architecture']} does not match "
            f"config.json ({architecture_of(model)})"
        )
    handles = {str(h.layer): h for h in adapter.ffns(model)}
    for layer, entry in manifest["layers"].items():
        handle = handles.get(layer)
        if handle is None:
            raise FFSplitError(f"{folder / MANIFEST}: layer {layer} does not exist in the model")
        where = f"{folder / MANIFEST}: layer {layer}"
        _check_specs(entry, adapter.weights(model, handle), where)
        modules = (
            build_part(entry["up"], where),
            build_part(entry["gate"], where) if "gate" in entry else None,
            build_part(entry["down"], where),
        )
        swap_ffn(model, adapter, handle, modules)  # type: ignore[arg-type]
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # corrupt headers surface as several exception types
        raise FFSplitError(f"{folder / WEIGHTS}: unreadable safetensors ({exc})") from None
    for name, t in state.items():
        if t.is_floating_point() and not all_finite(t):
            raise FFSplitError(f"{folder / WEIGHTS}: tensor {name} holds NaN or inf")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        reason = " ".join(str(exc).split())[:300]
        raise FFSplitError(
            f"{folder / WEIGHTS}: weights do not fit the manifest's structure ({reason})"
        ) from None
    tied = set(manifest.get("tied", {}))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise FFSplitError(
            f"{folder / WEIGHTS}: weights do not fit the manifest's structure "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device)
    model.eval()
    # The fused GPU path (contiguous stacks, Triton kernels) serves 16-bit models on CUDA.
    if fast and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            from ffsplit.split.fused import fuse_model
        except ImportError:
            pass
        else:
            fuse_model(model, adapter)
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    return model, tokenizer, manifest


def copy_variant(src: str | Path, dst: str | Path) -> Path:
    """Copy a verified variant folder atomically (e.g. into an artifact store)."""
    src = Path(src)
    verify_files(src, read_manifest(src))
    with atomic_dir(dst) as tmp:
        for p in src.iterdir():
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
    return Path(dst)
