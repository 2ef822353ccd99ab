"""tasks.evaluate.metrics: the MLflow metrics an evaluation record becomes (names per tasks.registry)."""

from __future__ import annotations

import math

import pytest

from tasks.evaluate import metrics

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
