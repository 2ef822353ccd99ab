"""Shared by the flow tests: a tiny Llama with SmolLM2's tokenizer, one Prefect test server, one
embedded Ray and one sqlite MLflow store per session (real services, no mocks).

Fixtures that start services are requested by name only, so tests/flows/test_stack.py (which
starts and stops its own) is unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)


def make_tiny_lm(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny Llama with SmolLM2's real tokenizer (ffsplit.models.tiny.save_tiny_lm)."""
    from ffsplit.models.tiny import save_tiny_lm

    return save_tiny_lm(folder, layers=layers, seed=seed)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("flows-tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server (prefect_test_harness) for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def flow_ray(ray_embedded: dict) -> dict:
    """The session's embedded Ray (tests/conftest.py), which in-process flow runs join (flows start
    one only if absent)."""
    return ray_embedded


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """sqlite:///<tmp>/mlflow.db: a real MLflow tracking and registry store without a server."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('flows-mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    return uri


@pytest.fixture
def pipeline_env(
    prefect_api: str,
    flow_ray: dict,
    mlflow_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict:
    """Services up; MLflow and FFSPLIT_HOME (cache, runs) for this test in the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("FFSPLIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return {
        "prefect": prefect_api,
        "mlflow": mlflow_store,
        "home": tmp_path / "home",
        "cache": tmp_path / "home" / "cache",
    }
