"""Content-hash keys for the pipeline's artifacts, so a re-run (or a resumed run) redoes nothing.

A key is the sha256 of everything the artifact depends on: input artifacts' keys or hashes,
config dicts, which part of the work (unit, layers) and the code version of the modules that
compute it. Artifacts are written atomically under the cache root, so an entry that exists is
complete: a run killed midway leaves only temp files, which are never taken as results.

Layout: ROOT/stats/units/KEY.safetensors, ROOT/stats/merged/KEY/, ROOT/shards/KEY/,
ROOT/variants/KEY/, ROOT/healed/KEY/, ROOT/evals/KEY.json, ROOT/plots/KEY-scores.png.

Nothing is ever evicted by a run. Every entry a flow uses (made or reused) gets its mtime set,
so `prune` can drop the least recently used ones down to a size (`python -m flows.cache`): every
stage checks for its own output, so a pruned entry is only work redone, never a wrong result.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError

CACHE_LAYOUT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]

# Modules whose source decides each artifact's content (besides its inputs).
CODE = {
    "stats": (
        "ffsplit.profiling",
        "ffsplit.data",
        "ffsplit.adapters",
        "ffsplit.models.loading",
        "ffsplit.jobs",
        "tasks.profile",
    ),
    "merged": ("ffsplit.profiling.stats", "ffsplit.selection", "tasks.aggregate"),
    "shard": (
        "ffsplit.compress",
        "ffsplit.split",
        "ffsplit.selection",
        "ffsplit.adapters",
        "ffsplit.config",
        "ffsplit.profiling.stats",
        "ffsplit.variant.shards",
        "tasks.compress",
    ),
    "variant": ("ffsplit.variant", "ffsplit.split", "tasks.assemble"),
    "heal": (
        "ffsplit.heal",
        "ffsplit.jobs",
        "ffsplit.config",
        "ffsplit.data",
        "ffsplit.variant",
        "ffsplit.split",
        "ffsplit.adapters",
        "tasks.heal",
    ),
    "eval": ("ffsplit.eval", "ffsplit.jobs", "ffsplit.data", "ffsplit.variant", "tasks.evaluate"),
}


def cache_root(root: str | Path | None = None) -> Path:
    """The cache root: root if given, else $FFSPLIT_HOME/cache, else ./.ffsplit/cache."""
    if root is not None:
        return Path(root).expanduser().resolve()
    home = os.environ.get("FFSPLIT_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".ffsplit"
    return (base / "cache").resolve()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FFSplitError(f"cache key input is not plain JSON data ({exc})") from None


def content_key(kind: str, **parts: Any) -> str:
    """sha256 hex of (kind, parts, layout version, code version of kind's modules)."""
    payload = {
        "kind": kind,
        "layout": CACHE_LAYOUT_VERSION,
        "code": code_version(kind),
        "parts": parts,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _source_files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise FFSplitError(f"cache: module {module!r} not found (is ffsplit installed?)")
    if spec.submodule_search_locations:
        files: list[Path] = []
        for folder in spec.submodule_search_locations:
            files.extend(sorted(Path(folder).rglob("*.py")))
        return files
    return [Path(spec.origin)] if spec.origin else []


@functools.cache
def code_version(kind: str) -> str:
    """Hash of the sources that compute an artifact kind, plus the torch/transformers versions."""
    from importlib.metadata import version

    if kind not in CODE:
        raise FFSplitError(f"cache: unknown artifact kind {kind!r}; known: {', '.join(CODE)}")
    digest = hashlib.sha256()
    for package in ("torch", "transformers", "safetensors"):
        digest.update(f"{package}={version(package)}\n".encode())
    for module in CODE[kind]:
        for path in _source_files(module):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{module}:{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ keys


def unit_stats_key(
    model_sha256: str,
    profile: dict[str, Any],
    unit: int,
    units: int,
    mode: str = "units",
    groups: int | None = None,
) -> str:
    """Statistics of one calibration unit (windows unit, unit+units, ...) of a base model."""
    return content_key(
        "stats",
        model=model_sha256,
        profile=profile,
        unit=unit,
        units=units,
        mode=mode,
        groups=groups,
    )


def merged_stats_key(unit_keys: list[str]) -> str:
    """Merged statistics: a fixed left fold over the units in unit order."""
    return content_key("merged", units=list(unit_keys))


def shard_key(
    model_sha256: str, stats_key: str | None, recipe: dict[str, Any], layers: list[int]
) -> str:
    """A shard of compressed layers: base weights, statistics, recipe, which layers."""
    return content_key(
        "shard", model=model_sha256, stats=stats_key, recipe=recipe, layers=sorted(layers)
    )


def variant_key(model_sha256: str, shard_keys: list[str]) -> str:
    """An assembled variant folder: the base model plus its shards (in layer order)."""
    return content_key("variant", model=model_sha256, shards=list(shard_keys))


def heal_key(variant_key: str, heal: dict[str, Any]) -> str:
    """A healed variant folder: the assembled (unhealed) variant plus the heal config."""
    return content_key("heal", variant=variant_key, heal=heal)


def eval_key(subject: str, params: dict[str, Any]) -> str:
    """An evaluation record of a variant key (or a base model's sha256) under some settings."""
    return content_key("eval", subject=subject, params=params)


# ----------------------------------------------------------------------------------------- paths


def unit_stats_path(root: Path, key: str) -> Path:
    return root / "stats" / "units" / f"{key}.safetensors"


def merged_stats_dir(root: Path, key: str) -> Path:
    return root / "stats" / "merged" / key


def shard_dir(root: Path, key: str) -> Path:
    return root / "shards" / key


def variant_dir(root: Path, key: str) -> Path:
    return root / "variants" / key


def healed_dir(root: Path, key: str) -> Path:
    return root / "healed" / key


def eval_path(root: Path, key: str) -> Path:
    return root / "evals" / f"{key}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A cached JSON record, or None when absent (a corrupt one counts as absent)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_stale_temps(root: Path, older_than_s: float = 3600.0) -> int:
    """Delete temp files/folders (".NAME.*.tmp") that killed runs left behind; returns the count.

    Only old ones: a temp file of a run still in progress is young.
    """
    import shutil

    if not root.is_dir():
        return 0
    now = time.time()
    removed = 0
    for path in root.rglob(".*.tmp"):
        try:
            if now - path.stat().st_mtime < older_than_s:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        except OSError:
            continue
    return removed


# ------------------------------------------------------------------ use marks and pruning

# Entry folders under the root: each file or folder directly inside one is one entry.
ENTRY_KINDS = {
    "stats/units": "unit statistics",
    "stats/merged": "merged statistics",
    "shards": "compressed shards",
    "variants": "variants",
    "healed": "healed variants",
    "evals": "evaluations",
    "plots": "score plots",
}
PRUNE_MIN_IDLE_S = 3600.0  # entries used more recently may belong to a run in progress


def mark_used(*paths: str | Path | None) -> None:
    """Set the mtime of cache entries a run made or reused (what prune ranks by); absent ones
    and unwritable ones are skipped: a use mark must never fail a run."""
    for path in paths:
        if path is None:
            continue
        try:
            os.utime(path)
        except OSError:
            continue


@dataclass(frozen=True)
class Entry:
    """One cache entry: a file or folder directly inside an entry folder."""

    path: Path
    kind: str
    bytes: int
    last_used: float


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for child in path.rglob("*"):
        try:
            if child.is_file():
                total += child.stat().st_size
        except OSError:
            continue
    return total


def entries(root: str | Path) -> list[Entry]:
    """Every complete entry under the cache root (temp files of runs are not entries)."""
    root = Path(root)
    out = []
    for kind in ENTRY_KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                out.append(Entry(path, kind, _size(path), path.stat().st_mtime))
            except OSError:  # removed meanwhile
                continue
    return out


@dataclass(frozen=True)
class PruneReport:
    """What prune removed (or would remove, dry_run) and what is left."""

    removed: tuple[Entry, ...]
    kept_bytes: int
    recent_bytes: int  # kept because used within min_idle_s
    dry_run: bool

    @property
    def freed_bytes(self) -> int:
        return sum(e.bytes for e in self.removed)


def prune(
    root: str | Path,
    max_bytes: int,
    min_idle_s: float = PRUNE_MIN_IDLE_S,
    dry_run: bool = False,
) -> PruneReport:
    """Remove least recently used entries until the cache holds at most max_bytes.

    Entries used within min_idle_s are kept whatever the size (a running flow may be reading
    them). Each removal first renames the entry to a temp name, so a concurrent run sees it either
    complete or absent, never half deleted; remove_stale_temps clears a rename a kill left behind.
    """
    import shutil

    if max_bytes < 0:
        raise FFSplitError(f"cache prune: max_bytes must be >= 0, got {max_bytes}")
    found = sorted(entries(root), key=lambda e: e.last_used)
    total = sum(e.bytes for e in found)
    now = time.time()
    removed: list[Entry] = []
    recent = 0
    for entry in found:
        if total <= max_bytes:
            break
        if now - entry.last_used < min_idle_s:
            recent += entry.bytes
            continue
        if not dry_run:
            doomed = entry.path.with_name(f".{entry.path.name}.prune.tmp")
            try:
                entry.path.rename(doomed)
            except OSError:  # gone already, or not ours to remove
                continue
            if doomed.is_dir():
                shutil.rmtree(doomed, ignore_errors=True)
            else:
                doomed.unlink(missing_ok=True)
        removed.append(entry)
        total -= entry.bytes
    return PruneReport(tuple(removed), total, recent, dry_run)
