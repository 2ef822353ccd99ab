"""GPU speed measurement: the interval statistics (pure) and the interleaved loop (eager on CPU)."""

import math

import pytest
import torch

from ffsplit.eval.gpu_speed import interleaved, measure_gpu_speed, ratio_interval


def test_interval_brackets_the_ratio_and_shrinks_with_agreement():
    noisy = ratio_interval([10.0, 12.0, 9.0, 11.0], [5.0, 5.5, 5.2, 4.9])
    tight = ratio_interval([10.0, 10.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.001])
    assert noisy.low < noisy.ratio < noisy.high
    assert tight.high - tight.low < noisy.high - noisy.low
    assert math.isclose(tight.ratio, 2.0, rel_tol=1e-3) and tight.faster


def test_overlapping_intervals_tie_and_a_slower_variant_is_not_faster():
    a = ratio_interval([10.0, 11.0, 9.5, 10.5], [10.0, 10.2, 9.9, 10.1])
    b = ratio_interval([10.0, 10.4, 9.8, 10.1], [9.9, 10.3, 10.0, 10.0])
    assert a.ties(b) and not a.faster
    clear = ratio_interval([20.0, 20.1, 19.9, 20.0], [10.0, 10.1, 9.9, 10.0])
    assert not clear.ties(a) and clear.faster


def test_interleaving_alternates_the_order():
    calls = []
    base = lambda: calls.append("b") or 2.0  # noqa: E731
    variant = lambda: calls.append("v") or 1.0  # noqa: E731
    result = interleaved(base, variant, 4)
    assert calls == ["b", "v", "v", "b", "b", "v", "v", "b"]
    assert result.ratio == pytest.approx(2.0) and result.repeats == 4


@torch.no_grad()
def test_measure_runs_the_same_loop_for_both_models_on_cpu():
    from ffsplit.models.tiny import tiny_model

    base, _ = tiny_model("LlamaForCausalLM")
    variant, _ = tiny_model("LlamaForCausalLM")
    speed = measure_gpu_speed(
        variant, base, batches=(1,), prefill_tokens=16, prompt=4, steps=3, repeats=3
    )
    assert speed.decode_b1 is not None and speed.decode_b16 is None
    metrics = speed.metrics()
    assert {"gpu_decode_speedup_b1", "gpu_prefill_speedup_low"} <= set(metrics)
    assert all(v > 0 for v in metrics.values())
    assert speed.device.startswith("cpu")


@pytest.mark.parametrize("architecture", ["BertModel", "MPNetModel"])
def test_an_encoder_is_timed_by_its_forward_within_its_positions(architecture):
    """Encoders have no decode loop (the GPU flow's MiniLM would fail in it): their forward is
    the prefill, at most as long as the position table."""
    from ffsplit.models.tiny import tiny_model

    base, _ = tiny_model(architecture)
    variant, _ = tiny_model(architecture)
    speed = measure_gpu_speed(variant, base, prefill_tokens=4096, repeats=3)
    assert speed.decode_b1 is None and speed.decode_b16 is None and speed.prefill is not None
    assert set(speed.metrics()) == {
        "gpu_prefill_speedup", "gpu_prefill_speedup_low", "gpu_prefill_speedup_high"
    }  # fmt: skip
    assert "encoder forward" in speed.loop
