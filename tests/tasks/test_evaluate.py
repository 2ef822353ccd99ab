"""tasks.evaluate: the task body's record, and the MLflow metrics a record becomes (names per
tracking.registry)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ffsplit.config import EvalConfig
from tasks.evaluate import evaluate, metrics

SIZE = {"total_params": 1000, "total_bytes": 2000, "ffn_bytes": 1200, "ffn_params": 600}


def test_language_model_record() -> None:
    dense = {"perplexity": 20.0, "size": SIZE, "ffn_reduction": 0.0}
    record = {
        "perplexity": 21.0,
        "ffn_reduction": 0.3,
        "size": {**SIZE, "ffn_params": 420},
        "latency": {
            "speedup": {"prefill": 1.2, "decode": 1.1},
            "variant": {"prefill_ms_median": 5.0, "decode_ms_per_token_median": 2.0},
        },
        "seconds": 3.0,
    }
    out = metrics(record, dense)
    assert out["perplexity_change_pct"] == pytest.approx(5.0)
    assert (out["ffn_params"], out["ffn_bytes"], out["parameters"]) == (420.0, 1200.0, 1000.0)
    assert (out["prefill_speedup"], out["decode_speedup"]) == (1.2, 1.1)
    assert "accuracy_stderr" not in out


def test_probe_accuracy_carries_its_test_size_and_standard_error() -> None:
    record = {"accuracy": 0.6, "size": SIZE, "eval": {"corpus": "tweets", "test": 1500}}
    out = metrics(record, {"accuracy": 0.5})
    assert out["accuracy_change_pct"] == pytest.approx(20.0)
    assert out["accuracy_test_examples"] == 1500.0
    assert out["accuracy_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 1500))
    no_size = metrics({"accuracy": 0.6, "size": SIZE, "eval": {}})
    assert "accuracy_stderr" not in no_size and "accuracy_test_examples" not in no_size


def test_non_finite_values_are_dropped() -> None:
    out = metrics({"perplexity": float("inf"), "size": SIZE})
    assert "perplexity" not in out and out["ffn_reduction"] == 0.0


def test_task_body_loads_the_subject_once_and_races_with_the_asked_workload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quality and the latency race on one load of the subject (the library job's path), with
    the workload the pipeline asked for; the record is written atomically and then reused."""
    import ffsplit.jobs.evaluate
    from ffsplit.models.tiny import save_tiny_lm

    folder = save_tiny_lm(tmp_path / "tiny", layers=2)
    loads = []
    real_load = ffsplit.jobs.evaluate.load_any
    monkeypatch.setattr(
        ffsplit.jobs.evaluate, "load_any", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    config = EvalConfig(tokens=256, window=128, prompt_tokens=16, decode_tokens=2, repeats=1)
    out = tmp_path / "eval.json"
    result = evaluate(subject=str(folder), config=config.to_dict(), out=str(out))
    record = result.record
    assert len(loads) == 1 and not result.cached
    assert record["latency"]["workload"]["prompt_tokens"] == 16
    assert record["latency"]["workload"]["decode_tokens"] == 2
    assert math.isfinite(record["perplexity"])
    assert json.loads(out.read_text())["params"] == config.key_dict()
    again = evaluate(subject=str(folder), config=config.to_dict(), out=str(out))
    assert again.cached and len(loads) == 1


def test_gpu_speed_becomes_metrics_the_champion_reads() -> None:
    from tracking.champion import speed_of

    gpu = {"gpu_decode_speedup_b1": 1.6, "gpu_decode_speedup_b1_low": 1.5}
    gpu["gpu_decode_speedup_b1_high"] = 1.7
    record = {"perplexity": 21.0, "size": SIZE, "gpu_speed": {"metrics": gpu}}
    out = metrics(record, {"perplexity": 20.0})
    assert {k: out[k] for k in gpu} == gpu
    speed = speed_of(out)
    assert (speed.metric, speed.low, speed.high) == ("gpu_decode_speedup_b1", 1.5, 1.7)
