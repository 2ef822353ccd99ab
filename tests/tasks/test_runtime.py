"""tasks/runtime.py: resources by what the cluster has, errors unwrapped, services checked."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ffsplit.errors import FFSplitError
from tasks import runtime


def _fails(message: str) -> None:
    raise FFSplitError(message)


def _threads_and_device() -> tuple[int, str]:
    return runtime.set_task_threads(), runtime.task_device()


def _attempt(counter: str) -> int:
    """Count this run of a task in a file (attempts survive the worker)."""
    path = Path(counter)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    return attempt


def _worker_dies_on_attempts(counter: str, deadly: int) -> int:
    attempt = _attempt(counter)
    if attempt <= deadly:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task
    return attempt


def _fails_once_counted(counter: str) -> None:
    _attempt(counter)
    raise FFSplitError("bad input: not retried")


def test_cpu_cluster_gets_cpu_tasks_with_fixed_threads(ray_cluster: dict) -> None:
    assert ray_cluster["gpus"] == 0 and ray_cluster["cpus"] == 3
    assert not runtime.has_gpus()
    assert runtime.task_resources(cpus=1) == {"num_cpus": 1, "num_gpus": 0}
    assert runtime.task_resources(cpus=99) == {"num_cpus": 3, "num_gpus": 0}  # capped to a node
    one = runtime.run_remote(_threads_and_device, resources=runtime.task_resources(cpus=1))
    two = runtime.run_remote(_threads_and_device, resources=runtime.task_resources(cpus=2))
    assert one == (1, "cpu") and two == (2, "cpu")


def test_task_errors_arrive_as_one_line_ffsplit_errors(ray_cluster: dict) -> None:
    with pytest.raises(FFSplitError) as caught:
        runtime.run_remote(_fails, "layer 3: bad input", resources={"num_cpus": 1})
    assert str(caught.value) == "layer 3: bad input"
    assert "Traceback" not in str(caught.value)
    results = runtime.run_many(_threads_and_device, [{}, {}, {}], resources={"num_cpus": 1})
    assert results == [(1, "cpu")] * 3


def test_a_task_whose_worker_dies_is_retried_a_bounded_number_of_times(
    ray_cluster: dict, tmp_path: Path
) -> None:
    import ray

    assert runtime.RETRY_POLICY == {"max_retries": 3, "retry_exceptions": False}
    killed_once = tmp_path / "once"
    assert runtime.run_remote(_worker_dies_on_attempts, str(killed_once), 1, resources={}) == 2
    # an error of the task itself is an answer: raised at once, never run again
    errors = tmp_path / "errors"
    with pytest.raises(FFSplitError, match="not retried"):
        runtime.run_remote(_fails_once_counted, str(errors), resources={})
    assert errors.read_text() == "1"
    # a task that kills every worker it lands on gives up after 1 + WORKER_DEATH_RETRIES runs
    always = tmp_path / "always"
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        runtime.run_remote(_worker_dies_on_attempts, str(always), 99, resources={})
    assert always.read_text() == str(1 + runtime.WORKER_DEATH_RETRIES)


def test_a_session_inside_a_running_ray_leaves_it_running(ray_cluster: dict) -> None:
    import ray

    with runtime.ray_session() as info:
        assert info["cpus"] == 3
    assert ray.is_initialized()


def test_a_running_ray_without_the_asked_resources_is_refused(ray_cluster: dict) -> None:
    """Reusing it would leave tasks that ask for the resource pending forever (the CI hang)."""
    with pytest.raises(FFSplitError, match="already running in this process without resources"):
        with runtime.ray_session(resources={"no_such_resource": 1}):
            pass
    with runtime.ray_session(resources={"one_worker": 1}) as info:  # present: reused
        assert info["cpus"] == ray_cluster["cpus"]


def test_joining_a_cluster_refuses_local_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(FFSplitError, match="drop num_cpus"):
        runtime.ensure_ray(num_cpus=2)


def test_runtime_env_carries_offline_settings_and_our_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFSPLIT_HOME", "/tmp/somewhere")
    env = runtime.runtime_env()["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["FFSPLIT_HOME"] == "/tmp/somewhere"


def _worker_env(names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def test_embedded_workers_get_our_variables_without_a_job_runtime_env(ray_cluster: dict) -> None:
    """The variables reach the workers through the raylet's environment: no job runtime_env,
    so the first tasks can run on the workers Ray prestarts (one per CPU) instead of each waiting
    for a new one to boot."""
    import ray

    names = sorted(runtime.WORKER_ENV)
    seen = runtime.run_remote(_worker_env, names, resources={"num_cpus": 1})
    assert seen == {name: runtime.WORKER_ENV[name] for name in names}
    assert not dict(ray.get_runtime_context().runtime_env)


def test_prefect_api_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(
        FFSplitError, match="PREFECT_API_URL=http://127.0.0.1:9/api is not reachable"
    ):
        runtime.check_prefect_api(timeout_s=2)


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _ray_processes() -> list:
    """This driver and every Ray process it started (GCS, raylet, agents, workers)."""
    import psutil

    me = psutil.Process()
    found = [me]
    for child in me.children(recursive=True):
        try:
            line = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if "ray" in line:
            found.append(child)
    return found


def test_embedded_ray_listens_on_loopback_only(ray_cluster: dict) -> None:
    """Issue 16: a single-machine run exposes nothing. Every listening socket of the embedded
    Ray (GCS, raylet, dashboard agent, runtime-env agent, workers, the driver) is on 127.0.0.1,
    and no dashboard serves unless asked for."""
    import psutil
    import ray

    assert runtime.run_remote(_threads_and_device, resources={"num_cpus": 1})  # workers up
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    listening = []
    processes = _ray_processes()
    for process in processes:
        try:
            sockets = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [
            (process.name(), c.laddr.ip, c.laddr.port)
            for c in sockets
            if c.status == psutil.CONN_LISTEN
        ]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the servers were seen
    exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert not any(port == 8265 for _, _, port in listening)  # no dashboard
