"""Suite-wide: the slow tier's longer per-test timeout, and the one embedded Ray of a session."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator

import pytest

SLOW_TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A task body run in-process sets torch's thread count to its worker's CPUs (e.g. 1); later
    tests compare logits bitwise with fresh processes, which a changed count would break."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# One embedded Ray per test session, shared by every package's tests. Ray lives once per process: a
# second fixture's ray_session would silently reuse the first one's instance, without its custom
# resources (tasks asking for them then wait forever). So the one instance carries all of them:
# "one_worker" / "three_workers" cap concurrency for the worker-count tests (tests/tasks).
RAY_CPUS = 3
RAY_RESOURCES = {"one_worker": 1, "three_workers": 3}


@pytest.fixture(scope="session")
def ray_embedded() -> Iterator[dict]:
    from tasks.runtime import ray_session

    with ray_session(num_cpus=RAY_CPUS, resources=RAY_RESOURCES) as info:
        yield info


# Ray's log monitor forwards raylet and worker lines ("(raylet) ...", "(pid=123) ...", maybe
# coloured) into the driver's stderr from a background thread, whenever they happen: e.g. the raylet's
# disk-space warning on a nearly full CI disk. A CLI's own error output is the rest.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|[\w.]*\s*pid=\d+[^)]*)\)")


@pytest.fixture
def own_lines() -> Callable[[str], list[str]]:
    """Split captured stderr into lines, dropping those Ray forwarded from other processes."""

    def split(err: str) -> list[str]:
        return [line for line in err.splitlines() if not _RAY_FORWARDED.match(line)]

    return split


# ------------------------------------------------------------------------------------- MLflow stores
# Real MLflow, no mocks (tests/tracking, tests/reports, tests/tasks):
# - `mlflow_uri`: a sqlite tracking/registry URI in a session temp folder (artifacts beside it). One
#   database per session because creating its tables takes ~5 s; tests keep apart by unique model
#   names (`unique_name`).
# - `mlflow_env`: MLFLOW_TRACKING_URI=mlflow_uri for one test.
# - `mlflow_server_uri`: a real `mlflow server` on 127.0.0.1 started through services/stack.py, stopped
#   by process group at the end of the session (only tests that ask for it pay its ~15 s start).

for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """sqlite:///<tmp>/mlflow.db: a real MLflow tracking and registry store without a server."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(
        max_results=1
    )  # make tables
    return uri


@pytest.fixture
def mlflow_env(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI=mlflow_uri for one test (code under test reads it from the env)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return mlflow_uri


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A model-name-safe name unique to this test run (shared stores then need no cleanup)."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def mlflow_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1, for the session."""
    from services.stack import StackConfig, start_stack, stop_stack

    home = tmp_path_factory.mktemp("mlflow-server")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # else the stack would only check it
    try:
        state = start_stack(
            StackConfig(home=home, prefect=False, mlflow=True, mlflow_port=0, timeout_s=240)
        )
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    try:
        yield state.services["mlflow"].url
    finally:
        stop_stack(home)
