"""ffsplit.jobs.observation_job (issue 6) on a tiny random encoder with MiniLM's real tokenizer and
real text: the record's keys (those bench/observation.py has always written), sane values, and the
checks of its settings. The causal-LM side runs through bench/observation.py
(tests/bench/test_observation.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.jobs import observation_job, observation_params

# The keys bench/observation.py has written since the first records (bench/results/observation/).
RECORD_KEYS = [
    "command",
    "machine",
    "model",
    "adapter",
    "profile",
    "data",
    "corpora",
    "heavy_ratio",
    "observation",
    "observation_other_corpus",
    "stability",
    "coverage",
    "ablation",
    "seconds",
]
SMALL = {"calib_tokens": 256, "eval_tokens": 128, "window": 64, "random_repeats": 2}


def _tiny_with_tokenizer(architecture: str, tokenizer_of: str, folder: Path) -> str:
    """A tiny random model (ffsplit.models.tiny) saved with a packaged model's real tokenizer."""
    from ffsplit.models.tiny import save_tiny_with_tokenizer

    return str(save_tiny_with_tokenizer(architecture, tokenizer_of, folder))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("obs-bert") / "tiny-bert"
    return _tiny_with_tokenizer("BertModel", "minilm-l6", folder)


def _check_common(record: dict, layers: int) -> None:
    obs = record["observation"]
    assert [r["layer"] for r in obs["layers"]] == list(range(layers))
    for row in obs["layers"]:
        assert 0 < row["top1_share"] <= row["top5_share"] <= row["top10_share"] <= 1
        assert 0 <= row["heavy_hit_rate"] <= 1 and row["heavy_neurons"] == 1  # ceil(1% of 96)
    assert set(record["stability"]) == {"1%", "5%", "10%"}
    for block in record["stability"].values():
        assert all(0 <= r["jaccard"] <= 1 for r in block["layers"])
    assert record["coverage"]["corpus"] == "news" and len(record["coverage"]["layers"]) == layers
    assert record["corpora"] == {"a": "wikipedia", "b": "news"}
    assert record["data"]["calibration"]["tokens"] == 256
    assert record["data"]["other_corpus"]["corpus"] == "news"
    assert record["profile"]["collect_grams"] is False
    ablation = record["ablation"]
    assert ablation["fraction"] == 0.01 and ablation["seeds"] == [0, 1]
    assert len(ablation["random"]) == 2 and math.isfinite(ablation["dense"])
    assert record["machine"]["torch"] == torch.__version__
    assert record["seconds"]["total"] > 0


def test_encoder_record_has_the_probe_and_the_hidden_state_ablation(tiny_bert: str) -> None:
    stages: list[tuple[str, int, int]] = []
    record = observation_job(
        tiny_bert, probe_limit=30, progress=lambda *s: stages.append(s), **SMALL
    )
    assert list(record) == [*RECORD_KEYS[:-1], "ablation_hidden", "seconds"]
    assert record["adapter"] == "bert" and record["data"]["probe"]["per_split"] == 30
    assert record["ablation"]["higher_is_better"] is True
    assert record["ablation"]["chance"] == pytest.approx(1 / 3)
    hidden = record["ablation_hidden"]
    assert hidden["dense"] == 0.0 and hidden["top"] > 0 and hidden["higher_is_better"] is False
    _check_common(record, layers=2)
    assert ("ablation", 5, 5) in stages and ("ablation hidden", 5, 5) in stages
    assert any(s[0] == "profile news" for s in stages)


def test_settings_are_checked_before_any_work() -> None:
    assert observation_params()["calib_tokens"] == 8192
    with pytest.raises(FFSplitError, match="random_repeats must be an integer >= 1, got 0"):
        observation_params(random_repeats=0)
    with pytest.raises(FFSplitError, match="eval_tokens .100. must be at least one window .512."):
        observation_params(eval_tokens=100)
    with pytest.raises(FFSplitError, match="probe_limit must be an integer >= 3"):
        observation_job("no-such-model", probe_limit=2)
    with pytest.raises(FFSplitError, match="unknown model 'no-such-model'"):
        observation_job("no-such-model")
