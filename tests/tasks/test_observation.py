"""tasks/observation.py (issue 6): the observation on Ray into an atomic record folder, reused when
complete and made with the same settings (its MLflow run: tests/tracking/test_observation.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ffsplit.jobs import observation_params
from tasks import observation as obs

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


def test_the_ray_task_writes_a_complete_folder_and_reuses_it(record_dir: Path) -> None:
    record = obs.read_record(record_dir)
    assert sorted(p.name for p in record_dir.iterdir()) == [
        "ablation.png",
        "observation.json",
        "observation.png",
        "settings.json",
    ]
    assert record["command"] == "test command"
    assert len(record["observation"]["layers"]) == LAYERS
    assert not list(record_dir.parent.glob(".*.tmp"))  # the atomic folder left no temp behind
    settings = json.loads((record_dir / obs.SETTINGS).read_text())
    again = obs.observe.run(
        model=settings["model"], model_sha256=None, params=PARAMS, out=str(record_dir), command="x"
    )
    assert again.cached is True and again.model == "tiny-llama"
    # other parameters or another model's weights do not count as done
    assert obs._complete(record_dir, {**settings, "params": {**PARAMS, "seed": 1}}) is None
    assert obs._complete(record_dir, {**settings, "weights_sha256": "0" * 64}) is None
    (record_dir / "ablation.png").rename(record_dir / "ablation.tmp")
    try:
        assert obs._complete(record_dir, settings) is None  # a plot missing: not complete
    finally:
        (record_dir / "ablation.tmp").rename(record_dir / "ablation.png")
