"""tracking/observation.py: an observation record folder as one MLflow run (real sqlite store, no
mocks): complete or nothing, per-layer series as metric steps, no model version, the same record
logged twice is one run, and records missing a key are refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ffsplit.errors import FFSplitError
from ffsplit.jobs import observation_params
from tasks import observation as obs
from tracking import observation as tracked
from tracking.registry import COMPLETE_TAG, CONTENT_TAG, ERROR_TAG, ROLE_TAG, RegistryError


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ffsplit.models.tiny import save_tiny_lm

    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "tiny-llama", layers=4))


@pytest.fixture(scope="session")
def ray_cluster(ray_embedded: dict) -> dict:
    return ray_embedded


PARAMS = observation_params(calib_tokens=256, eval_tokens=128, window=64, random_repeats=2)
LAYERS = 4  # tests/tasks/conftest.py's tiny Llama


@pytest.fixture(scope="module")
def record_dir(tiny_lm: str, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's observation, computed on Ray by the task body (once per module)."""
    out = tmp_path_factory.mktemp("observation") / "tiny-llama"
    result = obs.observe.run(
        model=tiny_lm, model_sha256=None, params=PARAMS, out=str(out), command="test command"
    )
    assert result.cached is False and result.model == "tiny-llama"
    return out


def renamed(record_dir: Path, name: str, folder: Path, **changes: object) -> Path:
    """A copy of a record folder whose model is `name` (its own experiment in the shared store)."""
    shutil.copytree(record_dir, folder)
    record = json.loads((folder / obs.RECORD).read_text())
    record["model"]["name"] = name
    record.update(changes)
    (folder / obs.RECORD).write_text(json.dumps(record))
    return folder


def test_a_logged_run_is_complete_with_series_params_and_artifacts(
    record_dir: Path, mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    folder = renamed(record_dir, unique_name, tmp_path / "record")
    record = obs.read_record(folder)
    stages: list[str] = []
    logged = tracked.log_observation(
        folder, mlflow_uri, tags={"ffsplit.flow": "test"}, progress=stages.append
    )
    assert stages == ["run", "params", "metrics", "artifacts", "verify", "complete"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(logged.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"ffsplit/{unique_name}" == f"ffsplit/{logged.model}"
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[COMPLETE_TAG] == "true"
    assert tags[ROLE_TAG] == "observation" and tags["ffsplit.flow"] == "test"
    params = run.data.params
    assert params["model"] == unique_name and params["command"] == "test command"
    assert (params["corpus_a"], params["corpus_b"]) == ("wikipedia", "news")
    assert params["calibration_tokens"] == "256" and params["heavy_ratio"] == "0.01"
    assert params["ablation_perplexity_metric"].startswith("perplexity")
    assert "git_commit" in params
    metrics = run.data.metrics
    mean = record["observation"]["mean"]
    assert metrics["mean_top1_share"] == mean["top1_share"]
    assert metrics["mean_hit_frequency"] == mean["heavy_hit_rate"]
    assert metrics["ablation_perplexity_dense"] == record["ablation"]["dense"]
    assert metrics["ablation_perplexity_random"] == record["ablation"]["random_mean"]
    for name in ("top1_share", "top5_share", "top10_share", "hit_frequency", "jaccard_1pct"):
        history = client.get_metric_history(logged.run_id, name)
        assert sorted(m.step for m in history) == list(range(LAYERS)), name
    jaccard = {m.step: m.value for m in client.get_metric_history(logged.run_id, "jaccard_5pct")}
    assert jaccard == {r["layer"]: r["jaccard"] for r in record["stability"]["5%"]["layers"]}
    assert {f.path for f in client.list_artifacts(logged.run_id, "plots")} == {
        "plots/observation.png",
        "plots/ablation.png",
    }
    assert MlflowClient(mlflow_uri).search_model_versions(f"run_id = '{logged.run_id}'") == []
    again = tracked.log_observation(folder, mlflow_uri)  # same content: the same run
    assert again.reused and again.run_id == logged.run_id


def test_a_failure_midway_leaves_no_run_that_looks_complete(
    record_dir: Path, mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    folder = renamed(record_dir, unique_name, tmp_path / "record")

    def fail_at_verify(stage: str) -> None:
        if stage == "verify":
            raise RuntimeError("disk full while verifying")

    with pytest.raises(RegistryError, match="disk full while verifying"):
        tracked.log_observation(folder, mlflow_uri, progress=fail_at_verify)
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name(f"ffsplit/{unique_name}")
    (failed,) = client.search_runs([experiment.experiment_id])
    assert failed.info.status == "FAILED" and COMPLETE_TAG not in failed.data.tags
    assert "disk full" in failed.data.tags[ERROR_TAG]
    assert client.list_artifacts(failed.info.run_id) == []
    ok = tracked.log_observation(folder, mlflow_uri)  # a failed run is never reused
    assert not ok.reused and ok.run_id != failed.info.run_id


def test_records_missing_a_key_are_refused_in_one_line_before_any_write(
    record_dir: Path, mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    folder = renamed(record_dir, unique_name, tmp_path / "record")
    record = json.loads((folder / obs.RECORD).read_text())
    top1 = record["observation"]["mean"].pop("top1_share")
    (folder / obs.RECORD).write_text(json.dumps(record))
    with pytest.raises(FFSplitError) as info:
        tracked.log_observation(folder, mlflow_uri)
    message = str(info.value)
    assert f"{folder / obs.RECORD}: key 'observation.mean.top1_share' is missing" in message
    assert "\n" not in message and "flows.observation run" in message
    record["observation"]["mean"]["top1_share"] = top1
    obs.check_record(record, "rec.json")
    del record["stability"]["5%"]["layers"][2]["jaccard"]
    with pytest.raises(FFSplitError, match=r"key 'stability\.5%\.layers\[2\]\.jaccard' is missing"):
        obs.check_record(record, "rec.json")
    with pytest.raises(FFSplitError, match=r"key 'ablation' is missing"):
        obs.check_record({k: v for k, v in record.items() if k != "ablation"}, "rec.json")
    (folder / obs.RECORD).unlink()
    with pytest.raises(FFSplitError, match=r"observation\.json does not exist"):
        tracked.log_observation(folder, mlflow_uri)
    assert MlflowClient(mlflow_uri).get_experiment_by_name(f"ffsplit/{unique_name}") is None


def test_metrics_name_the_ablation_kind_and_skip_what_is_not_finite(record_dir: Path) -> None:
    record = obs.read_record(record_dir)
    record["ablation"] = {**record["ablation"], "top": math.inf}
    scalars, series = tracked.observation_metrics(obs.check_record(record, "rec"))
    assert "ablation_perplexity_top" not in scalars and "ablation_perplexity_dense" in scalars
    assert tracked._non_finite(record) == ["ablation_perplexity_top"]
    assert set(series) >= {"top1_share", "hit_frequency", "jaccard_1pct", "jaccard_10pct"}
    assert obs.record_content(record) == obs.record_content(dict(reversed(record.items())))
    assert CONTENT_TAG  # the content tag makes a re-log of the same record a no-op (above)
