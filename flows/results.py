"""`python -m flows.results`: regenerate docs/results.md and its plots from the MLflow runs.

    python -m flows.results [--tracking-uri URI] [--models smollm2-135m gemma3-270m ...]
                            [--out docs/results.md]

The tracking URI is --tracking-uri, else MLFLOW_TRACKING_URI, else the local server recorded by
`python -m flows.stack up` (tracking.registry.tracking_uri). Reads every complete run of the
experiments 'ffsplit/<model>' (all of them, or those of --models), builds the page with
reports.results and writes the plots into docs/results/ and then the page, each atomically. An
unreachable server, an unknown model or a store without ffsplit runs is one line on stderr and exit
code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from ffsplit.errors import FFSplitError

DEFAULT_OUT = Path("docs/results.md")

# No telemetry; a server dying mid-read fails in seconds, not minutes (tracking.registry does the same).
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}.items():
    os.environ.setdefault(_key, _value)


def regenerate_command(models: list[str], out: Path) -> str:
    """The command line that makes the page, as the page states it (no URI: it may hold secrets)."""
    parts = [".venv/bin/python", "-m", "flows.results"]
    if models:
        parts += ["--models", *models]
    if out != DEFAULT_OUT:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def generate(
    tracking_uri: str | None = None,
    models: list[str] | None = None,
    out: str | Path = DEFAULT_OUT,
    now: datetime | None = None,
) -> tuple[Path, list[Path], int]:
    """Read the runs and write the page and its plots; returns (page, plots, variants shown)."""
    from reports import results
    from tracking import registry

    uri = tracking_uri or registry.tracking_uri()
    registry.check_reachable(uri)
    rows, source = results.read_rows(uri, models or None)
    out = Path(out)
    page, plots = results.write_page(
        rows,
        source,
        out,
        generated_at=now or datetime.now(UTC),
        command=regenerate_command(list(models or []), out),
    )
    return page, plots, len(rows)


def _models(values: list[str] | None) -> list[str]:
    return [m for v in values or [] for m in v.split(",") if m]


def main(argv: list[str] | None = None) -> int:
    """CLI entry; errors in one line, exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.results",
        description="Regenerate docs/results.md (and docs/results/*.png) from the MLflow runs.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local stack's server)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="base model names (experiments ffsplit/<name>); default: every ffsplit experiment",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the page (default %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        if args.out.suffix != ".md":
            raise FFSplitError(f"--out {args.out}: the page must be a .md file")
        page, plots, count = generate(args.tracking_uri, _models(args.models), args.out)
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {page} ({count} variants) and {len(plots)} plots in {page.with_suffix('')}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
