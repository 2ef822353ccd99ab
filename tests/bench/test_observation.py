"""bench/observation.py (issue 6): a thin CLI over ffsplit.jobs.observation_job, run on a tiny random
Llama (ffsplit.models.tiny) with SmolLM2's real tokenizer and real text; same flags, same outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import observation as bench  # noqa: E402

# The keys of the records in bench/results/observation/ (written before the job moved to ffsplit).
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


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama (ffsplit.models.tiny) saved with SmolLM2's real tokenizer."""
    from ffsplit.models.tiny import save_tiny_with_tokenizer

    folder = tmp_path_factory.mktemp("obs-llama") / "tiny-llama"
    return str(save_tiny_with_tokenizer("LlamaForCausalLM", "smollm2-135m", folder))


def test_the_record_keys_are_those_of_the_committed_records() -> None:
    for folder in sorted((REPO / "bench" / "results" / "observation").iterdir()):
        keys = list(json.loads((folder / "observation.json").read_text()))
        assert [k for k in keys if k != "ablation_hidden"] == RECORD_KEYS, folder.name


def test_bench_cli_writes_the_record_and_plots_of_a_causal_lm(
    tiny_llama: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["--model", tiny_llama, "--calib-tokens", "256", "--eval-tokens", "128"]
    args += ["--window", "64", "--random-repeats", "2", "--out", str(out)]
    assert bench.main(args) == 0
    record = json.loads((out / "observation.json").read_text())
    assert list(record) == RECORD_KEYS
    assert record["command"] == "python bench/observation.py " + " ".join(args)
    assert record["model"]["name"] == "tiny-llama" and record["adapter"] == "llama"
    assert set(record["data"]) == {"calibration", "other_corpus", "evaluation"}
    assert record["ablation"]["metric"] == "perplexity (wikipedia evaluation split)"
    assert record["ablation"]["higher_is_better"] is False
    rows = record["observation"]["layers"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0 < r["top1_share"] <= r["top5_share"] <= r["top10_share"] <= 1 for r in rows)
    assert record["ablation"]["seeds"] == [0, 1] and len(record["ablation"]["random"]) == 2
    assert {p.name for p in out.glob("*.png")} == {"observation.png", "ablation.png"}
    assert json.loads(capsys.readouterr().out)["model"] == "tiny-llama"  # the headline
    assert bench.main([*args[:-2], "--calib-tokens", "32", "--out", str(out)]) == 2
    assert "calib_tokens (32) must be at least one window (64)" in capsys.readouterr().err
