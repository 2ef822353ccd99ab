"""Prefect deployments of the flows on a process work pool (code, not prefect.yaml).

- `compress/default`: the compress flow with its defaults, run on demand.
- `sweep/nightly`: the sweep flow on a cron schedule, "0 2 * * *" in UTC.
- `cache-prune/nightly`: the pipeline cache pruned to 20 GB by least recent use, "30 1 * * *" in
  UTC, so the sweep starts with room (flows/cache.py).

The code is taken from this checkout (`Flow.from_source` on the repository folder: the worker runs
flows where the project is installed, nothing is pushed or pulled). PREFECT_API_URL is honoured
(Prefect reads it); the work pool is created when missing.

    python -m flows.deploy [--pool ffsplit-pool] [--paused]
    prefect deployment run 'sweep/nightly' --param budgets='[0.3]' --watch

It ends with a line per deployment saying its schedule and whether it is active or paused.

A worker must poll the pool: ``python -m flows.stack up --worker --pool ffsplit-pool``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ffsplit.config import DEFAULT_EVAL_TOKENS, DEFAULT_HEAVY_RATIO, PIPELINE_CALIB_TOKENS
from ffsplit.errors import FFSplitError

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "ffsplit-pool"
NIGHTLY_CRON = "0 2 * * *"
PRUNE_CRON = "30 1 * * *"
PRUNE_PARAMETERS: dict[str, Any] = {"max_gb": 20.0, "min_idle_hours": 1.0}
TIMEZONE = "UTC"
# The nightly sweep: the paper's grid on SmolLM2 at moderate token budgets (about an hour on 2 cores).
NIGHTLY_PARAMETERS: dict[str, Any] = {
    "model": "smollm2-135m",
    "methods": ["lowrank", "quant"],
    "heavy_ratios": [0.05, DEFAULT_HEAVY_RATIO],
    "budgets": [0.3, 0.5],
    "baselines": ["uniform", "random", "prune"],
    "quality_budget_pct": 10.0,
    "champion_objective": "speed",
    "calib_tokens": PIPELINE_CALIB_TOKENS,
    "eval_tokens": DEFAULT_EVAL_TOKENS,
}
# Set in every flow run the worker starts (the worker's own environment is inherited too).
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
DEPLOYMENTS = ("compress/default", "sweep/nightly", "cache-prune/nightly")


def build_deployments(pool: str = POOL, paused: bool = False) -> list[Any]:
    """RunnerDeployments of the flows on `pool` (nothing is sent to the server yet).

    paused: create the nightly deployment paused (tests: no sweep may start at 02:00 by itself).
    """
    from prefect import Flow
    from prefect.schedules import Cron

    compress = Flow.from_source(source=str(REPO_ROOT), entrypoint="flows/compress.py:compress")
    sweep = Flow.from_source(source=str(REPO_ROOT), entrypoint="flows/sweep.py:sweep")
    prune = Flow.from_source(source=str(REPO_ROOT), entrypoint="flows/cache.py:prune_cache")
    job = {"env": dict(RUN_ENV)}

    def nightly(flow: Any, cron: str, parameters: dict[str, Any], description: str) -> Any:
        return flow.to_deployment(
            name="nightly",
            work_pool_name=pool,
            job_variables=job,
            schedules=[Cron(cron, timezone=TIMEZONE)],
            paused=paused,
            parameters=parameters,
            description=description,
            tags=["ffsplit", "nightly"],
        )

    return [
        compress.to_deployment(
            name="default",
            work_pool_name=pool,
            job_variables=job,
            description="Compress one model by one recipe, evaluate it, register one MLflow version.",
            tags=["ffsplit"],
        ),
        nightly(
            sweep,
            NIGHTLY_CRON,
            NIGHTLY_PARAMETERS,
            "Nightly sweep: methods x heavy ratios x budgets plus baselines; aliases dense and "
            "champion.",
        ),
        nightly(
            prune,
            PRUNE_CRON,
            PRUNE_PARAMETERS,
            "Prune the pipeline cache to max_gb by least recent use before the nightly sweep.",
        ),
    ]


def ensure_pool(pool: str = POOL) -> None:
    """Create the process work pool if the server has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
            return
        if found.type != "process":
            raise FFSplitError(
                f"work pool {pool!r} exists with type {found.type!r}; the deployments need a "
                "'process' pool: pick another --pool name"
            )


def deploy(pool: str = POOL, paused: bool = False) -> list[str]:
    """Create or update the deployments on the server at PREFECT_API_URL; returns their ids."""
    import prefect

    from tasks.runtime import check_prefect_api

    if check_prefect_api() is None:
        raise FFSplitError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server; start one with "
            '`eval "$(python -m flows.stack up --worker --pool ffsplit-pool)"`'
        )
    ensure_pool(pool)
    ids = prefect.deploy(
        *build_deployments(pool, paused),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,  # its advice to use .serve for local runs: the pool is the point here
    )
    return [str(i) for i in ids]


def _when(schedule: Any) -> str:
    """'0 2 * * * UTC' for a cron schedule, else the schedule as Prefect prints it."""
    cron = getattr(schedule, "cron", None)
    return (
        f"'{cron}' {getattr(schedule, 'timezone', None) or ''}".strip() if cron else str(schedule)
    )


def schedule_report(pool: str = POOL) -> list[str]:
    """A line per deployment, read back from the server: its schedule and whether it is active
    (a paused deployment keeps its schedule but starts nothing)."""
    from prefect.client.orchestration import get_client

    lines = []
    with get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            found = client.read_deployment_by_name(name)
            crons = [_when(s.schedule) for s in found.schedules]
            if not crons:
                how = "no schedule, runs when asked"
            elif found.paused or not any(s.active for s in found.schedules):
                how = (
                    f"schedule {', '.join(crons)}, PAUSED: starts nothing; "
                    f"`python -m flows.deploy --pool {pool}` turns it on"
                )
            else:
                how = (
                    f"schedule {', '.join(crons)}, ACTIVE: the worker on pool {pool} runs it; "
                    f"`python -m flows.deploy --pool {pool} --paused` pauses it"
                )
            lines.append(f"deployment {name}: {found.id} ({how})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pool", default=POOL, help=f"process work pool (default {POOL})")
    parser.add_argument(
        "--paused",
        action="store_true",
        help="create the nightly deployments paused (their schedules start nothing)",
    )
    args = parser.parse_args(argv)
    try:
        ids = deploy(args.pool, args.paused)
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(ids) != len(DEPLOYMENTS):
        print(
            f"error: {len(ids)} deployments created, expected {len(DEPLOYMENTS)}", file=sys.stderr
        )
        return 2
    for line in schedule_report(args.pool):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
