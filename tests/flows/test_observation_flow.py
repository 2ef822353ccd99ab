"""The observation flow (issue 6) on a tiny Llama with real text, real Prefect, Ray and MLflow:
computed on Ray, written to the run folder, logged as one complete MLflow run in the model's
experiment; an existing record folder logged by `record`; bad input refused before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ffsplit.errors import FFSplitError
from flows.observation import main, observation
from tracking.registry import COMPLETE_TAG, ROLE_TAG

SMALL = {"calib_tokens": 256, "eval_tokens": 128, "window": 64, "random_repeats": 2}


def test_the_flow_computes_logs_and_logs_a_record_folder_once(
    tiny_lm: str, pipeline_env: dict, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = observation(models=[tiny_lm], run_dir=str(run_dir), **SMALL)
    (item,) = result["logged"]
    assert item["model"] == "tiny-llama" and not item["cached"] and not item["reused"]
    record_dir = run_dir / "tiny-llama"
    assert sorted(p.name for p in record_dir.iterdir()) == [
        "ablation.png",
        "observation.json",
        "observation.png",
        "settings.json",
    ]
    assert json.loads((run_dir / "results.json").read_text())["settings"]["calib_tokens"] == 256
    client = MlflowClient(tracking_uri=pipeline_env["mlflow"])
    run = client.get_run(item["run_id"])
    tags = run.data.tags
    assert client.get_experiment(run.info.experiment_id).name == "ffsplit/tiny-llama"
    assert run.info.status == "FINISHED" and tags[COMPLETE_TAG] == "true"
    assert tags[ROLE_TAG] == "observation" and tags["ffsplit.flow"] == "observation"
    assert tags["ffsplit.run_dir"] == str(run_dir.resolve()) and tags["ffsplit.flow_run_id"]
    assert run.data.params["command"] == tags["ffsplit.command"]  # how the record was computed
    assert run.data.params["calibration_tokens"] == "256"
    assert len(client.get_metric_history(item["run_id"], "top1_share")) == 4  # one per layer

    logged = observation(record=str(record_dir))["logged"]  # the same record: the same run
    assert logged == [{**logged[0], "run_id": item["run_id"], "reused": True}]


def test_bad_input_fails_in_one_line_before_any_work(
    tiny_lm: str,
    pipeline_env: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    own_lines: Callable[[str], list[str]],
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(FFSplitError, match="unknown model 'no-such-model'"):
        observation(models=["no-such-model"], run_dir=str(run_dir))
    with pytest.raises(FFSplitError, match=r"calib_tokens \(100\) must be at least one window"):
        observation(models=[tiny_lm], calib_tokens=100, window=512, run_dir=str(run_dir))
    with pytest.raises(FFSplitError, match="random_repeats must be an integer >= 1"):
        observation(models=[tiny_lm], random_repeats=0, run_dir=str(run_dir))
    with pytest.raises(FFSplitError, match="not both"):
        observation(models=[tiny_lm], record=str(tmp_path))
    assert not run_dir.exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "observation.json").write_text(json.dumps({"command": "x", "model": {}}))
    assert main(["log", "--record", str(bad)]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1
    assert f"{bad / 'observation.json'}: key 'model.name' is missing" in err[0]
    assert main(["log", "--record", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        MlflowClient(pipeline_env["mlflow"]).search_experiments(
            filter_string="name = 'ffsplit/bad'"
        )
        == []
    )
