"""A shard of compressed layers on disk: safetensors weights plus a JSON of part specs and reports.

Layer shards are compressed independently (one pipeline task each) and assembled into a variant
folder later, so a shard must rebuild its split modules exactly without the model: the JSON holds
each projection's spec (structure), the safetensors its state (values, in the compute dtype, so
assembly equals compressing in place). Same rules as variant folders: safetensors and JSON only,
written atomically, sha256 checked on load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffsplit.compress.results import CompressedLayer, LayerReport
from ffsplit.errors import FFSplitError
from ffsplit.files import atomic_dir, sha256_file, shown
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import build_part, check_loaded_parts

SHARD_FORMAT = "ffsplit-shard"
SHARD_FORMAT_VERSION = 1
SHARD_SPEC = "shard.json"
SHARD_WEIGHTS = "shard.safetensors"
PROJECTIONS = ("up", "gate", "down")


@dataclass
class Shard:
    """Compressed layers of one shard, with the recipe and whatever the writer recorded."""

    layers: dict[int, CompressedLayer]
    recipe: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def _report_dict(report: LayerReport) -> dict[str, Any]:
    out = asdict(report)
    if out["bits"] is not None:  # JSON keys are strings; keep bit widths as "8": count
        out["bits"] = {str(k): v for k, v in out["bits"].items()}
    return out


def _report_from(data: dict[str, Any], where: str) -> LayerReport:
    try:
        bits = data.get("bits")
        if bits is not None:
            data = {**data, "bits": {int(k): int(v) for k, v in bits.items()}}
        return LayerReport(**data)
    except (TypeError, ValueError) as exc:
        raise FFSplitError(f"{where}: malformed layer report ({exc})") from None


def save_shard(
    layers: Mapping[int, CompressedLayer],
    out: str | Path,
    *,
    recipe: dict[str, Any],
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write compressed layers as one shard folder (atomically); returns its path."""

    out = Path(out)
    if not layers:
        raise FFSplitError(f"{out}: a shard needs at least one compressed layer")
    if out.exists() and not overwrite:
        raise FFSplitError(f"shard folder {out} already exists; remove it or pass overwrite")
    tensors: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for index in sorted(layers):
        result = layers[index]
        if result.layer != index:
            raise FFSplitError(f"{out}: layer key {index} holds the result of layer {result.layer}")
        entry: dict[str, Any] = {"report": _report_dict(result.report)}
        for name, module in zip(PROJECTIONS, result.modules, strict=True):
            if module is None:
                continue
            entry[name] = module.spec()
            for key, value in module.state_dict().items():
                tensors[f"layer.{index}.{name}.{key}"] = value.detach().cpu().contiguous()
        tensors[f"layer.{index}.heavy"] = result.heavy_neurons.detach().cpu().contiguous()
        tensors[f"layer.{index}.order"] = result.order.detach().cpu().contiguous()
        entries[str(index)] = entry
    try:
        _write_shard(tensors, entries, out, recipe, meta, overwrite)
    except FileExistsError:
        raise FFSplitError(
            f"shard folder {shown(out)} already exists: another run wrote it first"
        ) from None
    return out


def _write_shard(
    tensors: dict[str, Tensor],
    entries: dict[str, Any],
    out: Path,
    recipe: dict[str, Any],
    meta: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / SHARD_WEIGHTS), metadata={"format": "pt"})
        spec = {
            "format": SHARD_FORMAT,
            "format_version": SHARD_FORMAT_VERSION,
            "recipe": recipe,
            "layers": entries,
            "weights_sha256": sha256_file(tmp / SHARD_WEIGHTS),
            "meta": meta or {},
        }
        (tmp / SHARD_SPEC).write_text(json.dumps(spec, indent=1, sort_keys=True))


def read_shard_spec(path: str | Path) -> dict[str, Any]:
    """The shard's JSON, validated (format, version, fields); no weights are read."""
    file = Path(path) / SHARD_SPEC
    if not file.is_file():
        raise FFSplitError(f"{path}: not a compressed-layer shard (no {SHARD_SPEC})")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FFSplitError(f"{file}: unreadable shard spec ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != SHARD_FORMAT:
        raise FFSplitError(f"{file}: not an ffsplit shard spec")
    version = spec.get("format_version")
    if not isinstance(version, int) or version > SHARD_FORMAT_VERSION:
        raise FFSplitError(
            f"{file}: shard format {version!r} is not readable by this ffsplit "
            f"(reads up to {SHARD_FORMAT_VERSION}); upgrade ffsplit or recompress"
        )
    for key in ("recipe", "layers", "weights_sha256"):
        if key not in spec:
            raise FFSplitError(f"{file}: shard spec lacks {key!r}")
    return spec


def shard_layers(path: str | Path) -> list[int]:
    """Layer indices a shard holds (from its JSON only)."""
    return sorted(int(k) for k in read_shard_spec(path)["layers"])


def load_shard(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Shard:
    """Rebuild a shard's split modules from its specs and load their exact values."""
    from safetensors.torch import load_file

    folder = Path(path)
    spec = read_shard_spec(folder)
    weights = folder / SHARD_WEIGHTS
    if not weights.is_file():
        raise FFSplitError(f"{weights}: missing (listed by {folder / SHARD_SPEC})")
    if verify and sha256_file(weights) != spec["weights_sha256"]:
        raise FFSplitError(f"{weights}: sha256 does not match {SHARD_SPEC}; the shard is corrupt")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as exc:  # corrupt headers surface as several exception types
        raise FFSplitError(f"{weights}: unreadable safetensors ({exc})") from None
    layers: dict[int, CompressedLayer] = {}
    for key, entry in spec["layers"].items():
        index = int(key)
        where = f"{folder / SHARD_SPEC}: layer {index}"
        modules: list[Any] = []
        for name in PROJECTIONS:
            if name not in entry:
                modules.append(None)
                continue
            module = build_part(entry[name], where)
            prefix = f"layer.{index}.{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise FFSplitError(
                    f"{where}: weights do not fit the spec of {name} ({exc})"
                ) from None
            check_loaded_parts(module, f"{where}: {name}")
            modules.append(module.to(device))
        up, gate, down = modules
        if not isinstance(up, SplitOutProjection) or not isinstance(down, SplitInProjection):
            raise FFSplitError(f"{where}: up/down must be split projections")
        heavy, order = state.get(f"layer.{index}.heavy"), state.get(f"layer.{index}.order")
        if heavy is None or order is None:
            raise FFSplitError(f"{where}: heavy or order indices missing from {weights}")
        report = _report_from(dict(entry["report"]), where)
        layers[index] = CompressedLayer(index, (up, gate, down), heavy.cpu(), order.cpu(), report)
    return Shard(layers, spec["recipe"], spec.get("meta", {}))
