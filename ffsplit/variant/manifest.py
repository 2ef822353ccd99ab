"""The variant manifest: everything needed to rebuild a compressed model and to trust its files.

It names the base model and its hash, the adapter, the recipe, the calibration data, the heavy
neurons, the structure (part specs) of every split projection, sizes, and the sha256 of every file.
The same dict becomes MLflow params and tags (style.md, 6).
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ffsplit.config import Recipe
from ffsplit.errors import FFSplitError

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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and validate a manifest; every problem is one line naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FFSplitError(f"{folder}: not an ffsplit variant (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FFSplitError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise FFSplitError(
            f"{path}: invalid or truncated JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    except RecursionError:
        raise FFSplitError(f"{path}: JSON nested too deeply to be a manifest") from None
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
    for name in manifest["files"]:
        if not isinstance(name, str) or not name or Path(name).name != name or name[0] == ".":
            raise FFSplitError(f"{path}: file name {name!r} escapes the variant folder")
    for key in ("base_model", "sizes"):
        if not isinstance(manifest[key], dict):
            raise FFSplitError(f"{path}: '{key}' must be an object")
    for key in ("adapter", "architecture"):
        if not isinstance(manifest[key], str):
            raise FFSplitError(f"{path}: '{key}' must be a string, got {manifest[key]!r}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise FFSplitError(f"{path}: 'tied' must map parameter names to parameter names")
    for key in SIZES:
        value = manifest["sizes"].get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise FFSplitError(f"{path}: sizes.{key} must be a finite number, got {value!r}")
    for layer, entry in manifest["layers"].items():
        if not layer.isdigit() or not isinstance(entry, dict):
            raise FFSplitError(f"{path}: layers.{layer} must be an object keyed by a layer index")
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
