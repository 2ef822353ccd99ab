"""The variant manifest: everything needed to rebuild a compressed model and to trust its files.

It names the base model and its hash, the adapter, the recipe, the calibration data, the heavy
neurons, the structure (part specs) of every split projection, sizes, and the sha256 of every file.
The same dict becomes MLflow params and tags (style.md, 6).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ffsplit.config import Recipe
from ffsplit.errors import FFSplitError
from ffsplit.files import read_json_strict, shown

FORMAT = "ffsplit-variant"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
NEURONS = "neurons.safetensors"


def ffsplit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ffsplit")
    except PackageNotFoundError:
        return "0+unknown"


def git_commit() -> str | None:
    """The code version that wrote an artifact (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ffsplit_version": ffsplit_version(),
        "git_commit": git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
    }


REQUIRED = (
    "format",
    "format_version",
    "base_model",
    "adapter",
    "architecture",
    "recipe",
    "layers",
    "files",
    "sizes",
)


SIZES = ("dense_ffn_bytes", "ffn_bytes", "ffn_reduction")
MANIFEST_MAX_BYTES = 64 << 20
# The files a variant may hold (save_variant writes them): anything else listed is refused, so
# no file is read that the format does not know.
REQUIRED_FILES = (WEIGHTS, "config.json")
VARIANT_FILES = frozenset(
    {
        WEIGHTS,
        NEURONS,
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _load_json(folder: Path) -> Any:
    """manifest.json's content: a regular file (not a folder, symlink or device), bounded in
    size, strict JSON (a duplicate key, e.g. a second 'files', is refused, not last-wins)."""
    path = folder / MANIFEST
    if not (path.exists() or path.is_symlink()):
        raise FFSplitError(f"{shown(folder)}: not an ffsplit variant (no {MANIFEST})")
    if path.is_symlink():
        raise FFSplitError(f"{shown(path)}: a symlink; a variant's files are plain files")
    return read_json_strict(path, "a variant manifest", MANIFEST_MAX_BYTES)


def _check_files(manifest: dict[str, Any], path: str) -> None:
    files = manifest["files"]
    for name, digest in files.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name[0] == ".":
            raise FFSplitError(f"{path}: file name {name!r} escapes the variant folder")
        if name not in VARIANT_FILES:
            raise FFSplitError(f"{path}: lists {name!r}, which is not a file a variant holds")
        if not isinstance(digest, str) or _HEX64.fullmatch(digest) is None:
            raise FFSplitError(f"{path}: files.{name} must be a sha256 (64 hex digits)")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise FFSplitError(
            f"{path}: lists no {' or '.join(missing)}: every file a variant loads must be listed "
            "with its sha256"
        )


def _check_sizes(sizes: dict[str, Any], path: str) -> None:
    """Sizes are counts of bytes (non-negative integers, compressed at most dense) and the
    reduction they give: a manifest cannot report a reduction its sizes do not make."""
    for key in ("dense_ffn_bytes", "ffn_bytes"):
        value = sizes.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FFSplitError(f"{path}: sizes.{key} must be a non-negative integer, got {value!r}")
    dense, compressed = sizes["dense_ffn_bytes"], sizes["ffn_bytes"]
    if dense < 1 or compressed > dense:
        raise FFSplitError(
            f"{path}: sizes ffn_bytes {compressed} and dense_ffn_bytes {dense} are inconsistent "
            "(need 0 <= ffn_bytes <= dense_ffn_bytes, dense_ffn_bytes >= 1)"
        )
    value = sizes.get("ffn_reduction")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value < 1
    ):
        raise FFSplitError(f"{path}: sizes.ffn_reduction must be a number in [0, 1), got {value!r}")
    if abs(value - (dense - compressed) / dense) > 1e-9:
        raise FFSplitError(
            f"{path}: sizes.ffn_reduction {value!r} is not what the sizes give "
            f"({(dense - compressed) / dense!r})"
        )


def _check_layers(layers: dict[str, Any], path: str) -> None:
    for layer, entry in layers.items():
        if not layer.isdigit() or not isinstance(entry, dict) or len(layer) > 6:
            raise FFSplitError(f"{path}: layers.{layer} must be an object keyed by a layer index")
        heavy = entry.get("heavy")
        if heavy is None:
            continue
        if (
            not isinstance(heavy, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in heavy)
            or len(set(heavy)) != len(heavy)
        ):
            raise FFSplitError(
                f"{path}: layers.{layer}.heavy must be distinct non-negative neuron indices"
            )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and validate a manifest; every problem is one line naming the file."""
    folder = Path(folder)
    path = shown(folder / MANIFEST)
    manifest = _load_json(folder)
    if not isinstance(manifest, dict):
        raise FFSplitError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise FFSplitError(
            f"{path}: not an ffsplit variant manifest (format={manifest.get('format')!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FFSplitError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FFSplitError(
            f"{path}: format version {version} is newer than this ffsplit reads ({FORMAT_VERSION}); "
            "upgrade ffsplit"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise FFSplitError(f"{path}: manifest lacks {', '.join(missing)}")
    if not isinstance(manifest["layers"], dict) or not isinstance(manifest["files"], dict):
        raise FFSplitError(f"{path}: 'layers' and 'files' must be objects")
    _check_files(manifest, path)
    for key in ("base_model", "sizes"):
        if not isinstance(manifest[key], dict):
            raise FFSplitError(f"{path}: '{key}' must be an object")
    base_sha = manifest["base_model"].get("weights_sha256")
    if base_sha is not None and (not isinstance(base_sha, str) or not _HEX64.fullmatch(base_sha)):
        raise FFSplitError(f"{path}: base_model.weights_sha256 must be a sha256, got {base_sha!r}")
    for key in ("adapter", "architecture"):
        if not isinstance(manifest[key], str):
            raise FFSplitError(f"{path}: '{key}' must be a string, got {manifest[key]!r}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise FFSplitError(f"{path}: 'tied' must map parameter names to parameter names")
    _check_sizes(manifest["sizes"], path)
    _check_layers(manifest["layers"], path)
    Recipe.from_dict(manifest["recipe"], where=f"{path}: recipe")
    return manifest


def flat_params(manifest: dict[str, Any]) -> dict[str, str]:
    """Manifest as flat key -> string pairs (MLflow params): recipe, base model, calibration."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    for key in (
        "recipe",
        "base_model",
        "calibration",
        "adapter",
        "architecture",
        "format_version",
        "ffsplit_version",
        "git_commit",
    ):
        if key in manifest:
            walk(key, manifest[key])
    return out
