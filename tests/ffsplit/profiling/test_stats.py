"""Statistics are exactly mergeable and survive a save/load round trip."""

import pytest
import torch

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.profiling import load_stats, merge_all, profile_model, save_stats

CONFIG = ProfileConfig(tokens=64, window=8, batch_size=2, hit_top_fraction=0.05)


def _windows(n=8, t=8, seed=0):
    return torch.randint(0, 150, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_merged_shards_equal_whole(architecture):
    model, _ = tiny_model(architecture)
    windows = _windows()
    whole = profile_model(model, windows, CONFIG)
    shards = [profile_model(model, windows[i : i + 3], CONFIG) for i in range(0, 8, 3)]
    merged = merge_all(shards)
    assert set(merged.layers) == set(whole.layers)
    for i, s in whole.layers.items():
        m = merged.layers[i]
        assert m.tokens == s.tokens == 64
        assert torch.equal(m.hits, s.hits)
        assert torch.equal(m.max_abs, s.max_abs)
        torch.testing.assert_close(m.sum_sq, s.sum_sq, rtol=1e-12, atol=0)
        torch.testing.assert_close(m.gram_in, s.gram_in, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.gram_hidden, s.gram_hidden, rtol=1e-5, atol=1e-6)


def test_stats_describe_the_activations():
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, _windows(), CONFIG)
    s = stats.layers[0]
    assert s.hits.sum() == s.tokens * s.hit_top_k
    assert (s.sum_sq > 0).all()
    assert (s.max_abs**2 <= s.sum_sq + 1e-12).all()
    torch.testing.assert_close(s.gram_hidden.diagonal(), s.sum_sq, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model, _ = tiny_model("GPT2LMHeadModel")
    stats = profile_model(model, _windows(), CONFIG, meta={"model": "tiny"})
    path = save_stats(stats, tmp_path / "stats.safetensors")
    loaded = load_stats(path)
    assert loaded.meta["model"] == "tiny"
    for i, s in stats.layers.items():
        assert torch.equal(loaded.layers[i].sum_sq, s.sum_sq)
        assert torch.equal(loaded.layers[i].gram_in, s.gram_in)


def test_corrupt_and_nan_statistics_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(FFSplitError, match="bad.safetensors"):
        load_stats(bad)
    model, _ = tiny_model("OPTForCausalLM")
    stats = profile_model(model, _windows(), CONFIG)
    stats.layers[1].sum_sq[0] = float("nan")
    path = save_stats(stats, tmp_path / "nan.safetensors")
    with pytest.raises(FFSplitError, match="NaN"):
        load_stats(path)


def test_merge_refuses_mismatched_layers():
    a = profile_model(tiny_model("OPTForCausalLM")[0], _windows(), CONFIG, layers=[0])
    b = profile_model(tiny_model("OPTForCausalLM")[0], _windows(), CONFIG, layers=[1])
    with pytest.raises(FFSplitError, match="different layers"):
        a.merged(b)
