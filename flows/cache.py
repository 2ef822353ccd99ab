"""The pipeline cache's size: what it holds, and pruning it down to a size by least recent use.

Runs never evict anything (a re-run reuses every finished artifact, tasks/cache.py), so a
machine running nightly sweeps grows its cache without bound: tens of GB of statistics, shards
and variants. Pruning removes the entries used longest ago; a pruned entry is only work a later
run redoes. Entries used within the last hour are kept (a run in progress may read them).

    python -m flows.cache show [--cache-dir DIR]
    python -m flows.cache prune --max-gb 20 [--min-idle-hours 1] [--dry-run] [--cache-dir DIR]

As a Prefect flow (`cache-prune`) it is deployed with a nightly schedule by services/deploy.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from ffsplit.errors import FFSplitError
from tasks import cache

GB = 1e9


def _non_negative(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise FFSplitError(f"cache prune: {name} must be a number >= 0, got {value!r}")
    return float(value)


def _checked(max_gb: float, min_idle_hours: float) -> tuple[int, float]:
    """(max bytes, min idle seconds) of validated prune settings."""
    max_gb = _non_negative("max_gb", max_gb)
    return int(max_gb * GB), _non_negative("min_idle_hours", min_idle_hours) * 3600.0


def usage(cache_dir: str | None = None) -> dict[str, Any]:
    """Entries and bytes per kind, and the total, of the cache root."""
    root = cache.cache_root(cache_dir)
    kinds: dict[str, dict[str, Any]] = {}
    for entry in cache.entries(root):
        row = kinds.setdefault(entry.kind, {"entries": 0, "bytes": 0, "oldest_use": None})
        row["entries"] += 1
        row["bytes"] += entry.bytes
        oldest = row["oldest_use"]
        row["oldest_use"] = entry.last_used if oldest is None else min(oldest, entry.last_used)
    return {
        "root": str(root),
        "kinds": kinds,
        "bytes": sum(k["bytes"] for k in kinds.values()),
        "entries": sum(k["entries"] for k in kinds.values()),
    }


@flow(name="cache-prune")
def prune_cache(
    max_gb: float = 20.0,
    min_idle_hours: float = 1.0,
    dry_run: bool = False,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Prune the pipeline cache to max_gb by least recent use (entries used within
    min_idle_hours are kept); dry_run lists what would go. Temp files killed runs left are
    removed too."""
    max_bytes, min_idle_s = _checked(max_gb, min_idle_hours)
    root = cache.cache_root(cache_dir)
    temps = 0 if dry_run else cache.remove_stale_temps(root)
    report = cache.prune(root, max_bytes, min_idle_s=min_idle_s, dry_run=dry_run)
    summary = {
        "root": str(root),
        "dry_run": dry_run,
        "max_bytes": max_bytes,
        "removed": [
            {"path": str(e.path), "kind": e.kind, "bytes": e.bytes, "last_used": e.last_used}
            for e in report.removed
        ],
        "freed_bytes": report.freed_bytes,
        "kept_bytes": report.kept_bytes,
        "kept_recent_bytes": report.recent_bytes,
        "stale_temps_removed": temps,
    }
    verb = "would free" if dry_run else "freed"
    print(
        f"cache {root}: {verb} {report.freed_bytes / GB:.2f} GB in {len(report.removed)} entries; "
        f"{report.kept_bytes / GB:.2f} GB left"
        + (
            f" ({report.recent_bytes / GB:.2f} GB over the limit kept: used within "
            f"{min_idle_hours:g} h)"
            if report.kept_bytes > max_bytes
            else ""
        )
    )
    return summary


def _show(cache_dir: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    info = usage(cache_dir)
    table = Table(title=f"ffsplit cache {info['root']}")
    for column in ("kind", "entries", "GB", "oldest use"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    now = time.time()
    for kind, label in cache.ENTRY_KINDS.items():
        row = info["kinds"].get(kind)
        if row is None:
            continue
        age_h = (now - row["oldest_use"]) / 3600.0
        table.add_row(label, str(row["entries"]), f"{row['bytes'] / GB:.2f}", f"{age_h:.1f} h ago")
    table.add_row("total", str(info["entries"]), f"{info['bytes'] / GB:.2f}", "")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.cache`: show the cache, or prune it; errors in one line."""
    parser = argparse.ArgumentParser(prog="python -m flows.cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="entries and size per kind")
    show.add_argument("--cache-dir", default=None)
    cut = sub.add_parser("prune", help="remove least recently used entries down to a size")
    cut.add_argument("--max-gb", type=float, required=True)
    cut.add_argument("--min-idle-hours", type=float, default=1.0)
    cut.add_argument("--dry-run", action="store_true")
    cut.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            if args.cache_dir and not Path(args.cache_dir).is_dir():
                raise FFSplitError(f"--cache-dir {args.cache_dir}: no such folder")
            _show(args.cache_dir)
            return 0
        # the flow's body, without a flow run: no Prefect server needed to tidy a disk
        prune_cache.fn(
            max_gb=args.max_gb,
            min_idle_hours=args.min_idle_hours,
            dry_run=args.dry_run,
            cache_dir=args.cache_dir,
        )
        return 0
    except FFSplitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
