"""flows/watch.py: `python -m flows.watch NAME` follows a real flow run on the session's Prefect
server (conftest's prefect_api) from another process, as the demo does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from flows.watch import group_of, ui_url

REPO = Path(__file__).resolve().parents[2]


@task
def step(value: int) -> int:
    time.sleep(0.3)
    return value


@task
def broken() -> None:
    raise ValueError("the shard file is truncated")


@flow(name="watch-test")
def staged(fail: bool = False) -> int:
    """Stages named like the pipeline's: units, a default-named task, shards of one variant."""
    units = [step.with_options(task_run_name=f"profile-unit-{i}").submit(i) for i in range(2)]
    total = sum(u.result() for u in units)
    total += step.submit(1).result()  # default name: step-0
    shards = [
        step.with_options(task_run_name=f"compress-lowrank-h0.10-r0.4-layers-{i}-{i}").submit(i)
        for i in range(3)
    ]
    total += sum(s.result() for s in shards)
    total += step.with_options(task_run_name="evaluate-lowrank-h0.10-r0.4").submit(0).result()
    if fail:
        broken.with_options(task_run_name="register-lowrank-h0.10-r0.4").submit().result()
    return total


def test_task_run_names_group_by_stage_and_variant() -> None:
    assert group_of("compress-quant-h0.10-r0.4-layers-8-15") == (
        "compress",
        "compress-quant-h0.10-r0.4",
    )
    assert group_of("aggregate-0") == ("aggregate", "aggregate")
    assert group_of("score-plot-bc0") == ("score-plot", "score-plot")  # a default name, hex key
    assert group_of("profile-unit-1") == ("profile", "profile-unit-1")
    assert group_of("evaluate-dense") == ("evaluate", "evaluate-dense")
    assert ui_url("http://127.0.0.1:4200/api", "x") == "http://127.0.0.1:4200/runs/flow-run/x"


def _watch_while_running(api: str, fail: bool) -> tuple[subprocess.CompletedProcess[str], Any]:
    name = f"watch-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": api}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "flows.watch", name, "--interval", "0.5", "--timeout", "240"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = staged.with_options(flow_run_name=name)(fail=fail)
        except Exception as exc:  # the failing flow raises here; the watcher reports it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=240)
    out, err = watcher.communicate(timeout=120)
    return subprocess.CompletedProcess(watcher.args, watcher.returncode, out, err), outcome


@pytest.mark.pipeline
def test_watch_follows_a_completed_run(prefect_api: str) -> None:
    done, outcome = _watch_while_running(prefect_api, fail=False)
    assert outcome.get("value") == 1 + 1 + 3 + 0, outcome
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "/runs/flow-run/" in lines[0] and lines[0].startswith("flow run watch-")
    text = done.stdout
    assert "profile   unit-0" in text and "[profile 2/2]" in text
    assert "compress  lowrank-h0.10-r0.4" in text and "3 tasks" in text  # shards as one line
    assert "[step 1/1]" in text
    assert "── profile done: 2 groups" in text and "── compress done: 1 group" in text
    assert "COMPLETED" in text and "flow run completed in" in lines[-1]
    order = [text.index(s) for s in ("profile done", "compress done", "evaluate done")]
    assert order == sorted(order)


@pytest.mark.pipeline
def test_watch_reports_a_failed_task_and_exits_1(prefect_api: str) -> None:
    done, outcome = _watch_while_running(prefect_api, fail=True)
    assert "error" in outcome
    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ register  lowrank-h0.10-r0.4 (FAILED" in done.stdout
    assert "the shard file is truncated" in done.stdout
    assert "flow run FAILED" in done.stdout


def test_watch_without_server_or_run_is_one_line_exit_2(prefect_api: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.watch", "nope", "--appear", "1"]
    unset = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and "PREFECT_API_URL is not set" in unset.stderr
    missing = subprocess.run(
        cmd, cwd=REPO, env={**env, "PREFECT_API_URL": prefect_api}, capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: no flow run with name 'nope' at {prefect_api}"
    ]
