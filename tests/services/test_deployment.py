"""Deployments end to end: a real Prefect server, process work pool + worker and MLflow server
(services/stack.py), `python -m flows.deploy`, then `prefect deployment run 'sweep/nightly' --param
... --watch` on the real SmolLM2 with small token budgets; the flow run completes and the MLflow
registry holds every version and both aliases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from services.deploy import NIGHTLY_CRON, POOL

REPO = Path(__file__).resolve().parents[2]
CLIENT_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")


def _prefect(api_url: str, method: str, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def _run(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_deployments_are_built_from_this_checkout_on_the_pool() -> None:
    from services.deploy import NIGHTLY_PARAMETERS, PRUNE_CRON, PRUNE_PARAMETERS, build_deployments

    compress, nightly, prune = build_deployments(POOL)
    assert (compress.flow_name, compress.name) == ("compress", "default")
    assert (nightly.flow_name, nightly.name) == ("sweep", "nightly")
    assert (prune.flow_name, prune.name) == ("cache-prune", "nightly")
    assert compress.work_pool_name == nightly.work_pool_name == prune.work_pool_name == POOL
    assert prune.entrypoint == "flows/cache.py:prune_cache"
    [prune_schedule] = prune.schedules
    assert prune_schedule.schedule.cron == PRUNE_CRON and prune.parameters == PRUNE_PARAMETERS
    assert compress.entrypoint == "flows/compress.py:compress"
    assert nightly.entrypoint == "flows/sweep.py:sweep"
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON and schedule.schedule.timezone == "UTC"
    assert schedule.active and not nightly.paused
    assert nightly.parameters == NIGHTLY_PARAMETERS
    assert not compress.schedules
    assert nightly.job_variables["env"]["HF_HUB_OFFLINE"] == "1"
    [_, paused, prune_paused] = build_deployments(POOL, paused=True)
    assert paused.paused and prune_paused.paused
    # the parameter schemas are the flows' own: a bad name is refused by the server, not ignored
    assert {"methods", "budgets", "quality_budget_pct"} <= set(
        nightly._parameter_openapi_schema.properties
    )


@pytest.mark.pipeline
@pytest.mark.slow
def test_nightly_sweep_deployment_runs_through_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from services.stack import StackConfig, local_stack

    home = tmp_path / "home"
    monkeypatch.setenv("FFSPLIT_HOME", str(home))  # the worker and its flow runs inherit it
    for var in CLIENT_VARS:
        monkeypatch.delenv(var, raising=False)
    config = StackConfig(
        home=home, worker=True, pool=POOL, prefect_port=0, mlflow_port=0, timeout_s=300
    )
    with local_stack(config) as stack:
        env = {**os.environ, **stack.env()}
        deployed = _run([sys.executable, "-m", "flows.deploy", "--paused"], env, 300)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        said = [line for line in deployed.stderr.splitlines() if line.startswith("deployment ")]
        assert len(said) == 3, deployed.stderr[-3000:]
        assert "sweep/nightly" in said[1] and "'0 2 * * *' UTC, PAUSED" in said[1]
        assert "cache-prune/nightly" in said[2] and "PAUSED" in said[2]
        assert "compress/default" in said[0] and "no schedule" in said[0]
        api = stack.services["prefect"].url
        nightly = _prefect(api, "GET", "/deployments/name/sweep/nightly")
        assert nightly["work_pool_name"] == POOL
        [schedule] = nightly["schedules"]
        assert schedule["schedule"]["cron"] == NIGHTLY_CRON
        assert schedule["schedule"]["timezone"] == "UTC"
        assert nightly["paused"] is True  # --paused: nothing starts at 02:00 during the test
        assert _prefect(api, "GET", "/deployments/name/compress/default")["work_pool_name"] == POOL
        prune = _prefect(api, "GET", "/deployments/name/cache-prune/nightly")
        assert prune["work_pool_name"] == POOL and prune["paused"] is True
        run_dir = tmp_path / "run"
        name = "t-deployment-smollm2"
        params = {
            "model": "smollm2-135m",
            "methods": ["quant"],
            "heavy_ratios": [0.1],
            "budgets": [0.5],
            "baselines": ["uniform"],
            "calib_tokens": 1024,
            "eval_tokens": 1024,
            "profile_units": 2,
            "compress_shards": 2,
            "quality_budget_pct": 100.0,
            "register_as": name,
            "run_dir": str(run_dir),
            # no latency race (minutes on a busy 2-core runner); the champion is then the smallest
            "latency": False,
            "champion_objective": "size",
        }
        args = [
            str(Path(sys.executable).parent / "prefect"),
            "deployment",
            "run",
            "sweep/nightly",
            "--watch",
            "--watch-timeout",
            "900",
        ]
        for key, value in params.items():
            args += ["--param", f"{key}={json.dumps(value)}"]
        ran = _run(args, env, 960)
        assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
        assert "Completed" in ran.stdout
        runs = _prefect(
            api, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}}}
        )
        assert [r["state_type"] for r in runs] == ["COMPLETED"]  # ours; the schedule is paused
        results = json.loads((run_dir / "results.json").read_text())
        assert [r["series"] for r in results["rows"]] == ["dense", "ffsplit-quant", "uniform-quant"]
        uri = stack.services["mlflow"].url
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(str(v.version) for v in versions) == sorted(
            r["version"] for r in results["rows"]
        )
        assert all(v.tags.get("ffsplit.complete") == "true" for v in versions)
        tags = client.get_run(versions[0].run_id).data.tags
        assert tags["ffsplit.command"].startswith("prefect deployment run sweep/nightly --param")
        assert tags["ffsplit.run_dir"] == str(run_dir.resolve())
        assert tags["ffsplit.flow_run_id"] == runs[0]["id"]
        assert (
            str(client.get_model_version_by_alias(name, "dense").version)
            == results["dense_version"]
        )
        assert (
            str(client.get_model_version_by_alias(name, "champion").version)
            == (results["champion"]["version"])
        )
        dense_ppl = results["rows"][0]["perplexity"]
        assert 10 < dense_ppl < 60  # the real SmolLM2 on Wikipedia text (about 24 on 16k tokens)
