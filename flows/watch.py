"""`python -m flows.watch FLOW_RUN`: follow a Prefect flow run from its task runs, as they finish.

Prints the flow run's UI address first, then one line per finished task group (a variant's compress
shards count as one group) with its stage, how many of that stage are done, and the wall seconds,
a line when a stage is through, state changes of the flow run, and failures with their message.
Exits 0 when the flow run completes, 1 when it fails, crashes or is cancelled, 3 on --timeout
(the run goes on), 2 on bad input (no server, no such run).

FLOW_RUN is a flow run id or name (`prefect deployment run ... --flow-run-name NAME`; a name is
waited for up to --appear seconds). Everything is read from the Prefect API at PREFECT_API_URL
(stdlib HTTP; nothing of the flow is imported), so it follows any flow of any deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PAGE = 200  # the API's largest page of task runs
SETTLE_S = 20.0  # how long an ended run's task run states may lag (they arrive as events)
# Prefect's default task run name is "<task>-<call number>" or "<task>-<3 hex digits>"; the
# pipeline's own names are "<stage>-<what>" (profile-unit-0, evaluate-LABEL), a compress shard's
# "<stage>-<label>-layers-<a>-<b>" (flows/stages.py).
_DEFAULT_NUMBERED = re.compile(r"^([A-Za-z_]\w*)-\d+$")
_DEFAULT_HEX = re.compile(r"^(.+)-(?=[0-9]*[a-f])[0-9a-f]{3}$")
_SHARD = re.compile(r"-layers-\d+-\d+$")


class WatchError(Exception):
    """A one-line reason the watch cannot go on (exit 2)."""


def _api(api_url: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    handlers = []
    if urllib.parse.urlsplit(api_url).hostname in ("127.0.0.1", "localhost", "::1"):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=10.0) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise WatchError(
            f"Prefect at {api_url}: {method} {path} answered HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WatchError(f"Prefect at {api_url} is not reachable ({reason})") from None


def find_flow_run(api_url: str, ref: str, appear_s: float = 30.0) -> dict[str, Any]:
    """The flow run with id or name ref (a name is waited for: a run just created may lag)."""
    try:
        run_id = str(uuid.UUID(ref))
    except ValueError:
        run_id = None
    deadline = time.monotonic() + appear_s
    while True:
        if run_id is not None:
            found = _api(api_url, "GET", f"/flow_runs/{run_id}")
        else:
            runs = _api(
                api_url,
                "POST",
                "/flow_runs/filter",
                {"flow_runs": {"name": {"any_": [ref]}}, "sort": "START_TIME_DESC", "limit": 1},
            )
            found = runs[0] if runs else None
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise WatchError(f"no flow run with {'id' if run_id else 'name'} {ref!r} at {api_url}")
        time.sleep(1.0)


def task_runs(api_url: str, flow_run_id: str) -> list[dict[str, Any]]:
    """All task runs of a flow run, oldest first."""
    out: list[dict[str, Any]] = []
    while True:
        page = _api(
            api_url,
            "POST",
            "/task_runs/filter",
            {
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": PAGE,
                "offset": len(out),
            },
        )
        out += page or []
        if not page or len(page) < PAGE:
            return out


def group_of(name: str) -> tuple[str, str]:
    """(stage, group) of a task run name: 'evaluate-lowrank-h0.10-r0.4' -> ('evaluate', that name);
    shards 'compress-X-layers-0-7' -> ('compress', 'compress-X'); default names 'aggregate-0' ->
    ('aggregate', 'aggregate') and 'score-plot-bc0' -> ('score-plot', 'score-plot')."""
    default = _DEFAULT_HEX.match(name) or _DEFAULT_NUMBERED.match(name)
    if default:
        return default.group(1), default.group(1)
    group = _SHARD.sub("", name)
    return group.split("-", 1)[0], group


def _seconds(run: dict[str, Any]) -> float:
    return float(run.get("total_run_time") or 0.0)


def _message(run: dict[str, Any]) -> str:
    state = run.get("state") or {}
    text = " ".join(str(state.get("message") or run.get("state_name") or "").split())
    return text[:300]


@dataclass
class Watch:
    """What has been printed so far, and the printing (rich) of what is new."""

    console: Console
    started: float = field(default_factory=time.monotonic)
    flow_state: str | None = None
    printed: set[str] = field(default_factory=set)  # groups reported
    stages_done: set[str] = field(default_factory=set)
    stage_order: list[str] = field(default_factory=list)

    def stamp(self) -> str:
        return escape(f"[{time.monotonic() - self.started:5.0f} s]")

    def flow(self, run: dict[str, Any]) -> None:
        state = run.get("state_type")
        if state != self.flow_state:
            self.flow_state = state
            name = escape(str(run.get("name")))
            self.console.print(f"{self.stamp()} flow run {name}: [bold]{state}[/]")

    def tasks(self, runs: list[dict[str, Any]], final: bool = False) -> None:
        groups: dict[str, list[dict[str, Any]]] = {}
        stages: dict[str, set[str]] = {}
        for run in runs:
            stage, group = group_of(str(run.get("name", "")))
            groups.setdefault(group, []).append(run)
            stages.setdefault(stage, set()).add(group)
            if stage not in self.stage_order:
                self.stage_order.append(stage)
        for group, members in groups.items():
            if group in self.printed or not all(m.get("state_type") in TERMINAL for m in members):
                continue
            self.printed.add(group)
            stage = group_of(str(members[0].get("name", "")))[0]
            done = sum(1 for g in stages[stage] if g in self.printed)
            failed = [m for m in members if m.get("state_type") != "COMPLETED"]
            seconds = max(_seconds(m) for m in members)
            label = escape(group[len(stage) + 1 :] if group.startswith(stage + "-") else "")
            shards = f", {len(members)} tasks" if len(members) > 1 else ""
            count = escape(f"[{stage} {done}/{len(stages[stage])}]")
            stage = escape(stage)
            if failed:
                self.console.print(
                    f"{self.stamp()} [red]✗[/] {stage:<9} {label} ({failed[0].get('state_type')}: "
                    f"{escape(_message(failed[0]))})  {count}"
                )
            else:
                self.console.print(
                    f"{self.stamp()} [green]✓[/] {stage:<9} {label} {seconds:.1f} s{shards}  {count}"
                )
        self._stages(stages, final)

    def _stages(self, stages: dict[str, set[str]], final: bool) -> None:
        """A line when every group of a stage is through and a later stage has begun (or at the
        end): stages run one after another, so that stage is over."""
        for i, stage in enumerate(self.stage_order):
            if stage in self.stages_done:
                continue
            later = any(s in stages for s in self.stage_order[i + 1 :])
            if (later or final) and stages.get(stage, set()) <= self.printed:
                self.stages_done.add(stage)
                self.console.print(
                    f"{self.stamp()} [bold]── {escape(stage)} done[/]: {len(stages[stage])} "
                    f"{'group' if len(stages[stage]) == 1 else 'groups'}"
                )


def _settled(
    api_url: str, flow_run_id: str, interval_s: float, grace_s: float = SETTLE_S
) -> list[dict[str, Any]]:
    """Task runs of an ended flow run once the API has them all in final states: task run states
    reach the API as events, so they can lag the flow run's own state by a few seconds."""
    deadline = time.monotonic() + grace_s
    runs = task_runs(api_url, flow_run_id)
    while time.monotonic() < deadline:
        if all(r.get("state_type") in TERMINAL for r in runs):
            time.sleep(min(interval_s, 1.0))  # and no new ones arrive meanwhile
            again = task_runs(api_url, flow_run_id)
            if len(again) == len(runs) and all(r.get("state_type") in TERMINAL for r in again):
                return again
            runs = again
            continue
        time.sleep(min(interval_s, 1.0))
        runs = task_runs(api_url, flow_run_id)
    return runs


def ui_url(api_url: str, flow_run_id: str) -> str:
    base = api_url.rstrip("/")
    base = base[: -len("/api")] if base.endswith("/api") else base
    return f"{base}/runs/flow-run/{flow_run_id}"


def watch(
    ref: str,
    *,
    api_url: str,
    interval_s: float = 2.0,
    timeout_s: float = 0.0,
    appear_s: float = 30.0,
    console: Console | None = None,
) -> int:
    """Follow the flow run until it ends; the exit code (see the module docstring)."""
    console = console or Console(highlight=False, soft_wrap=True)  # a URL is never wrapped
    run = find_flow_run(api_url, ref, appear_s)
    run_id = run["id"]
    deployment = ""
    if run.get("deployment_id"):
        found = _api(api_url, "GET", f"/deployments/{run['deployment_id']}")
        if found:
            flow = _api(api_url, "GET", f"/flows/{found.get('flow_id')}") or {}
            deployment = f" of deployment {flow.get('name', '?')}/{found.get('name')}"
    console.print(escape(f"flow run {run.get('name')}{deployment}: {ui_url(api_url, run_id)}"))
    state = Watch(console)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        run = _api(api_url, "GET", f"/flow_runs/{run_id}") or run
        state.flow(run)
        done = run.get("state_type") in TERMINAL
        runs = _settled(api_url, run_id, interval_s) if done else task_runs(api_url, run_id)
        state.tasks(runs, final=done)
        if done:
            seconds = float(run.get("total_run_time") or 0.0)
            if run["state_type"] == "COMPLETED":
                console.print(f"{state.stamp()} flow run completed in {seconds:.0f} s")
                return 0
            console.print(
                f"{state.stamp()} [red]flow run {run['state_type']}[/]: {escape(_message(run))}; "
                f"see {ui_url(api_url, run_id)}"
            )
            return 1
        if deadline is not None and time.monotonic() > deadline:
            console.print(
                f"{state.stamp()} still {run.get('state_type')} after {timeout_s:.0f} s; the run "
                f"goes on: python -m flows.watch {run_id}"
            )
            return 3
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.watch",
        description="Follow a Prefect flow run's stages and task runs until it ends.",
    )
    parser.add_argument("flow_run", help="flow run id or name")
    parser.add_argument("--interval", type=float, default=2.0, help="poll every S seconds")
    parser.add_argument("--timeout", type=float, default=0.0, help="give up after S s (0: never)")
    parser.add_argument("--appear", type=float, default=30.0, help="wait S s for a named run")
    args = parser.parse_args(argv)
    api_url = os.environ.get("PREFECT_API_URL", "").strip()
    if not api_url:
        print(
            'error: PREFECT_API_URL is not set: eval "$(python -m flows.stack env)" first',
            file=sys.stderr,
        )
        return 2
    try:
        return watch(
            args.flow_run,
            api_url=api_url,
            interval_s=args.interval,
            timeout_s=args.timeout,
            appear_s=args.appear,
        )
    except WatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped watching; the flow run goes on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
