"""Shared by the task tests: a tiny Llama with SmolLM2's real tokenizer, and one embedded Ray.

The tiny model (4 layers, d=64, FFN 192, random weights) runs the real pipeline on real text in
seconds; it borrows the tokenizer of the packaged SmolLM2 (cached by scripts/test.sh).
MLflow stores (sqlite, and a real server) are at the end (see the MLflow section).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY_LAYERS = 4


def make_tiny_lm(folder: Path, layers: int = TINY_LAYERS, seed: int = 0) -> Path:
    """A random tiny Llama with SmolLM2's real tokenizer (ffsplit.models.tiny.save_tiny_lm)."""
    from ffsplit.models.tiny import save_tiny_lm

    return save_tiny_lm(folder, layers=layers, seed=seed)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "tiny-llama"))


@pytest.fixture(scope="session")
def ray_cluster(ray_embedded: dict) -> dict:
    """The session's embedded Ray (tests/conftest.py: 3 logical CPUs).

    Custom resources cap concurrency for the worker-count tests: tasks asking for one unit of
    "one_worker" run one at a time, of "three_workers" up to three at once.
    """
    return ray_embedded


# ------------------------------------------------------------------------------------- MLflow stores
# Real MLflow, no mocks (tests/tasks/test_registry.py):
# - `mlflow_uri`: a sqlite tracking/registry URI in a session temp folder (artifacts beside it). One
#   database per session because creating its tables takes ~5 s; tests keep apart by unique model
#   names (`unique_name`).
# - `mlflow_env`: MLFLOW_TRACKING_URI=mlflow_uri for one test.
# - `mlflow_server_uri`: a real `mlflow server` on 127.0.0.1 started through flows/stack.py, stopped
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
    from flows.stack import StackConfig, start_stack, stop_stack

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
