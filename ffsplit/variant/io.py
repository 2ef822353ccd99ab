"""Save and load compressed variants: a self-describing folder, safetensors and JSON only.

load_variant rebuilds the base architecture from config.json, swaps split modules built from the
manifest's part specs, then loads weights whose sha256 the manifest vouches for. No pickle, no
remote code; a folder is written atomically, so a crash never leaves a half-written variant.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNWeights, adapter_by_name, architecture_of
from ffsplit.compress.budget import FFNShape, dense_ffn_bytes
from ffsplit.compress.results import CompressedLayer, CompressionReport
from ffsplit.errors import FFSplitError
from ffsplit.files import atomic_dir, parse_json_strict, read_hashed, sha256_file, shown
from ffsplit.models.folder import check_config, check_tokenizer_config, private_folder
from ffsplit.models.loading import (
    SLACK_ELEMENTS,
    all_finite,
    check_tokenizer_fits,
    empty_model,
    load_tokenizer,
    model_class_of,
    read_config,
)
from ffsplit.split.apply import swap_ffn
from ffsplit.split.parts import build_part, check_loaded_parts
from ffsplit.variant.manifest import MANIFEST, NEURONS, WEIGHTS, new_manifest, read_manifest


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
    with _published(out), atomic_dir(out, overwrite=overwrite) as tmp:
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


@contextlib.contextmanager
def _published(out: Path) -> Iterator[None]:
    """A no-replace publish that lost a race becomes one line, not a traceback."""
    try:
        yield
    except FileExistsError:
        raise FFSplitError(
            f"output folder {shown(out)} already exists: another run wrote it first; choose "
            "another --out or remove it"
        ) from None


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is a plain file (not a symlink) with its recorded sha256."""
    for name, digest in manifest["files"].items():
        path = folder / name
        if path.is_symlink():
            raise FFSplitError(f"{shown(path)}: a symlink; a variant's files are plain files")
        if not path.is_file():
            raise FFSplitError(f"{shown(path)}: missing (listed in {shown(folder / MANIFEST)})")
        actual = sha256_file(path)
        if actual != digest:
            raise FFSplitError(_mismatch(path, actual, digest))


def _mismatch(path: Path, actual: str, digest: Any) -> str:
    return (
        f"{shown(path)}: sha256 {actual[:12]}... does not match the manifest "
        f"({str(digest)[:12]}...): the file is corrupt, truncated or was changed"
    )


def _read_listed(folder: Path, name: str, manifest: dict[str, Any], verify: bool) -> bytes:
    """A listed file's bytes, hashed as read: what is checked is exactly what is used."""
    path = folder / name
    if path.is_symlink():
        raise FFSplitError(f"{shown(path)}: a symlink; a variant's files are plain files")
    if not path.is_file():
        raise FFSplitError(f"{shown(path)}: missing (listed in {shown(folder / MANIFEST)})")
    data, actual = read_hashed(path)
    if verify and actual != manifest["files"][name]:
        raise FFSplitError(_mismatch(path, actual, manifest["files"][name]))
    return data


def _tensors(data: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # corrupt headers surface as several exception types
        reason = " ".join(str(exc).split())[:300]
        raise FFSplitError(f"{shown(path)}: unreadable safetensors ({reason})") from None


def _check_specs(entry: dict[str, Any], dense: FFNWeights, where: str) -> None:
    """Part specs must fit the FFN (m neurons, hidden size d) before anything is allocated, so a
    damaged or hostile manifest cannot ask for absurd sizes."""
    m, d = dense.up.shape
    projections = [("up", True), ("down", False)] + ([("gate", True)] if "gate" in entry else [])
    if dense.gate is not None and "gate" not in entry:
        raise FFSplitError(f"{where}: the FFN is gated but the manifest has no gate spec")
    if dense.gate is None and "gate" in entry:
        raise FFSplitError(f"{where}: the FFN has no gate but the manifest has a gate spec")
    kept: dict[str, int] = {}
    for name, outward in projections:
        spec = entry.get(name)
        parts = spec.get("parts") if isinstance(spec, dict) else None
        if not isinstance(parts, list) or not parts:
            raise FFSplitError(f"{where}: {name} spec has no list of parts")
        expected = "split_out" if outward else "split_in"
        if spec.get("type") in ("split_out", "split_in") and spec.get("type") != expected:
            raise FFSplitError(f"{where}: {name} spec must be {expected}, got {spec.get('type')}")
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
            kept_columns = part.get("kept", 0)  # column-outlier parts: bf16 input columns
            if (
                isinstance(kept_columns, bool)
                or not isinstance(kept_columns, int)
                or not 0 <= kept_columns <= size_in
            ):
                raise FFSplitError(
                    f"{where}: {name} part keeps {kept_columns!r} columns; a {size_out}x{size_in} "
                    f"part keeps an integer count in 0..{size_in}"
                )
        kept[name] = neurons
    if len(set(kept.values())) != 1:
        raise FFSplitError(f"{where}: the projections keep different neuron counts {kept}")


def _stage(folder: Path, manifest: dict[str, Any], private: Path, verify: bool) -> None:
    """Copy every listed file but the tensors into private, hash-checked as read; JSON strict;
    a tokenizer that asks for custom code refused. transformers reads only these copies."""
    for name in sorted(manifest["files"]):
        if name in (WEIGHTS, NEURONS):
            continue
        data = _read_listed(folder, name, manifest, verify)
        if name.endswith(".json"):
            content = parse_json_strict(data, shown(folder / name))
            if name == "config.json":
                check_config(content, shown(folder / name))
            if name == "tokenizer_config.json":
                check_tokenizer_config(content, shown(folder / name))
        (private / name).write_bytes(data)


def _ffn_bytes(model: nn.Module, adapter: Adapter, handle: Any) -> int:
    """Bytes of one FFN as it now is: split modules count themselves, dense ones at 16 bits."""
    modules = [model.get_submodule(p) for p in handle.projection_paths]
    if all(hasattr(m, "nbytes") for m in modules):
        return sum(m.nbytes() for m in modules)
    return dense_ffn_bytes(FFNShape.from_weights(adapter.weights(model, handle)))


def _build(
    folder: Path,
    manifest: dict[str, Any],
    adapter: Adapter,
    private: Path,
    state: dict[str, Tensor],
    dtype: torch.dtype,
) -> tuple[nn.Module, dict[int, int]]:
    """(model, dense neuron count per layer): the variant's structure: counted on the meta device against the weights read, every part
    spec checked against the FFN it replaces, sizes checked against the structure, then built."""
    where = shown(folder / MANIFEST)
    config = read_config(private, shown(folder / "config.json"))
    skeleton = empty_model(config, shown(folder / "config.json"))
    if architecture_of(skeleton) != manifest["architecture"]:
        raise FFSplitError(
            f"{where}: architecture {manifest['architecture']} does not match "
            f"config.json ({architecture_of(skeleton)})"
        )
    handles = {str(h.layer): h for h in adapter.ffns(skeleton)}
    for layer, entry in manifest["layers"].items():
        if layer not in handles:
            raise FFSplitError(f"{where}: layer {layer} does not exist in the model")
        dense_weights = adapter.weights(skeleton, handles[layer])
        _check_specs(entry, dense_weights, f"{where}: layer {layer}")
        if any(i >= dense_weights.neurons for i in entry.get("heavy") or ()):
            raise FFSplitError(
                f"{where}: layer {layer}: heavy neuron index out of range "
                f"(the FFN has {dense_weights.neurons} neurons)"
            )
    _check_fits(skeleton, adapter, state, where)
    dense = {
        k: dense_ffn_bytes(FFNShape.from_weights(adapter.weights(skeleton, h)))
        for k, h in handles.items()
    }
    model = model_class_of(config, where)._from_config(config, dtype=dtype)
    for layer, entry in manifest["layers"].items():
        part_where = f"{where}: layer {layer}"
        modules = (
            build_part(entry["up"], part_where),
            build_part(entry["gate"], part_where) if "gate" in entry else None,
            build_part(entry["down"], part_where),
        )
        for module in modules:  # float parameters in the model's dtype; quantized parts keep
            if module is not None:  # their codes, scales and zero points as stored (parts.py)
                module.to(dtype)
        swap_ffn(model, adapter, handles[layer], modules)  # type: ignore[arg-type]
    sizes = {
        "dense_ffn_bytes": sum(dense.values()),
        "ffn_bytes": sum(_ffn_bytes(model, adapter, h) for h in handles.values()),
    }
    for key, actual in sizes.items():
        if manifest["sizes"][key] != actual:
            raise FFSplitError(
                f"{where}: sizes.{key} {manifest['sizes'][key]} is not what the structure holds "
                f"({actual}); the manifest was changed"
            )
    neurons = {h.layer: adapter.weights(skeleton, h).neurons for h in handles.values()}
    return model, neurons


def _check_fits(
    skeleton: nn.Module, adapter: Adapter, state: dict[str, Tensor], where: str
) -> None:
    """All but the FFNs is stored as is: the model config.json describes must not need more
    values than the weights hold (a config of another, larger model is refused before any
    memory is allocated)."""
    ffn = {
        id(p)
        for h in adapter.ffns(skeleton)
        for path in h.projection_paths
        for p in skeleton.get_submodule(path).parameters()
    }
    rest = sum(p.numel() for p in skeleton.parameters() if id(p) not in ffn)
    stored = sum(t.numel() for t in state.values())
    if rest > stored + SLACK_ELEMENTS:
        raise FFSplitError(
            f"{where}: config.json describes {rest:,} parameters outside the FFNs but the weights "
            f"hold {stored:,} values: config and weights are of different models"
        )


def _load_weights(
    folder: Path, manifest: dict[str, Any], model: nn.Module, state: dict[str, Tensor]
) -> None:
    """Weights into the built structure: finite, of the stored kind (no integer tensor where a
    float is expected), every one used and none missing but the tied ones."""
    path = shown(folder / WEIGHTS)
    for name, t in state.items():
        if t.is_floating_point() and not all_finite(t):
            raise FFSplitError(f"{path}: tensor {name} holds NaN or inf")
    expected = model.state_dict()
    for name, t in state.items():
        target = expected.get(name)
        if target is not None and target.is_floating_point() != t.is_floating_point():
            raise FFSplitError(
                f"{path}: tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}, "
                f"the model holds {str(target.dtype).removeprefix('torch.')}"
            )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        reason = " ".join(str(exc).split())[:300]
        raise FFSplitError(
            f"{path}: weights do not fit the manifest's structure ({reason})"
        ) from None
    tied = manifest.get("tied", {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise FFSplitError(
            f"{path}: weights do not fit the manifest's structure "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    check_loaded_parts(model, path)  # e.g. column-outlier indices distinct and in range
    for name, source in tied.items():
        if name not in expected or source not in expected or name in state:
            raise FFSplitError(
                f"{shown(folder / MANIFEST)}: tied {name} -> {source} is not a tie of this model"
            )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in tied.items():  # a tie the config does not make would leave name random
        if name in params and source in params and params[name] is not params[source]:
            if params[name].data_ptr() != params[source].data_ptr():
                raise FFSplitError(
                    f"{shown(folder / MANIFEST)}: tied {name} -> {source} is not a tie of this "
                    "model's config (it would keep random values)"
                )


def _check_neurons(
    folder: Path,
    manifest: dict[str, Any],
    model: nn.Module,
    adapter: Adapter,
    neurons: dict[int, int],
    verify: bool,
) -> None:
    """neurons.safetensors (heavy set and neuron order per layer) agrees with the model: indices
    in range, distinct, as many as the split keeps, and the heavy set the manifest lists."""
    path = folder / NEURONS
    tensors = _tensors(_read_listed(folder, NEURONS, manifest, verify), path)
    handles = {h.layer: h for h in adapter.ffns(model)}
    for key, tensor in tensors.items():
        layer, _, kind = key.removeprefix("layer.").partition(".")
        handle = handles.get(int(layer)) if layer.isdigit() else None
        if (
            handle is None
            or kind not in ("heavy", "order")
            or tensor.dim() != 1
            or tensor.is_floating_point()
        ):
            raise FFSplitError(f"{shown(path)}: unexpected tensor {key!r}")
        values = tensor.tolist()
        m = neurons[handle.layer]
        if len(set(values)) != len(values) or any(v < 0 or v >= m for v in values):
            raise FFSplitError(f"{shown(path)}: {key} holds indices out of range or repeated")
        listed = manifest["layers"].get(layer, {}).get("heavy")
        if kind == "heavy" and listed is not None and sorted(values) != sorted(listed):
            raise FFSplitError(f"{shown(path)}: {key} is not the heavy set the manifest lists")


def load_variant(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
    fast: bool = True,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer or None, manifest) of a variant folder, ready for inference.

    Only through its manifest: only the files it lists are read, each hashed as it is read
    (verify=False skips the comparison, never the listing). On CUDA with fast=True the split FFNs
    switch to the fused GPU execution path when available.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    try:
        adapter = adapter_by_name(manifest["adapter"])
    except FFSplitError as exc:
        raise FFSplitError(f"{shown(folder / MANIFEST)}: {exc}") from None
    with private_folder() as private:
        _stage(folder, manifest, private, verify)
        state = _tensors(_read_listed(folder, WEIGHTS, manifest, verify), folder / WEIGHTS)
        model, neurons = _build(folder, manifest, adapter, private, state, dtype)
        _load_weights(folder, manifest, model, state)
        del state
        if NEURONS in manifest["files"]:
            _check_neurons(folder, manifest, model, adapter, neurons, verify)
        tokenizer = load_tokenizer(private, f"variant {shown(folder)}")
    check_tokenizer_fits(model, tokenizer, f"variant {shown(folder)}")
    if tokenizer is not None:
        tokenizer.name_or_path = str(folder)
    model.config._name_or_path = str(folder)
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
    return model, tokenizer, manifest


def copy_variant(src: str | Path, dst: str | Path) -> Path:
    """Copy a verified variant folder atomically (e.g. into an artifact store)."""
    src = Path(src)
    manifest = read_manifest(src)
    verify_files(src, manifest)
    with _published(Path(dst)), atomic_dir(dst) as tmp:
        for name in (*sorted(manifest["files"]), MANIFEST):  # listed files only
            shutil.copy2(src / name, tmp / name)
    return Path(dst)
