"""Statistics are exactly mergeable and survive a save/load round trip."""

import pytest
import torch

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.profiling import load_stats, merge_all, profile_model, save_stats
from ffsplit.profiling.stats import pack_symmetric, unpack_symmetric

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


def _save_format_1(stats, path):
    """A statistics file as format 1 wrote it: full Gram matrices."""
    from safetensors.torch import save_file

    save_stats(stats, path)
    tensors = load_file_raw(path)
    full = {}
    for name, t in tensors.items():
        if name.endswith("_tril"):
            full[name[: -len("_tril")]] = unpack_symmetric(t)
        else:
            full[name] = t
    save_file(full, str(path), metadata={"format": "ffsplit-stats", "format_version": "1"})


def load_file_raw(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_grams_are_stored_packed_and_come_back_exactly(tmp_path):
    model, _ = tiny_model("LlamaForCausalLM")
    stats = profile_model(model, _windows(), CONFIG)
    path = save_stats(stats, tmp_path / "stats.safetensors")
    raw = load_file_raw(path)
    m = stats.layers[0].neurons
    assert raw["layer.0.gram_hidden_tril"].shape == (m * (m + 1) // 2,)
    assert "layer.0.gram_hidden" not in raw
    loaded = load_stats(path)
    for i, s in stats.layers.items():
        assert torch.equal(s.gram_hidden, s.gram_hidden.T)  # observe keeps them symmetric
        assert torch.equal(loaded.layers[i].gram_hidden, s.gram_hidden)
        assert torch.equal(loaded.layers[i].gram_in, s.gram_in)


def test_an_asymmetric_product_is_mirrored():
    from ffsplit.profiling.stats import _symmetric

    product = torch.arange(9.0).reshape(3, 3)
    sym = _symmetric(product)
    assert torch.equal(sym, sym.T) and torch.equal(sym.tril(), product.tril())


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_pack_round_trip(n):
    g = torch.randn(n, n, dtype=torch.float64)
    g = g + g.T
    packed = pack_symmetric(g)
    assert packed.shape == (n * (n + 1) // 2,)
    assert torch.equal(unpack_symmetric(packed), g)


def test_merging_packed_files_equals_merging_full_statistics(tmp_path):
    model, _ = tiny_model("LlamaForCausalLM")
    windows = _windows()
    parts = [profile_model(model, windows[i : i + 4], CONFIG) for i in (0, 4)]
    paths = [save_stats(p, tmp_path / f"u{k}.safetensors") for k, p in enumerate(parts)]
    _save_format_1(parts[1], paths[1])  # an old unit file merges with a new one
    packed = load_stats(paths[0], packed=True).merged(load_stats(paths[1], packed=True))
    assert packed.layers[0].gram_hidden.dim() == 1
    saved = load_stats(save_stats(packed, tmp_path / "merged.safetensors"))
    full = merge_all(parts)
    for i, s in full.layers.items():
        assert torch.equal(saved.layers[i].gram_hidden, s.gram_hidden)
        assert torch.equal(saved.layers[i].gram_in, s.gram_in)
        assert torch.equal(saved.layers[i].sum_sq, s.sum_sq)
    with pytest.raises(FFSplitError, match="packed Grams with full"):
        load_stats(paths[0], packed=True).merged(load_stats(paths[1]))


def test_format_1_files_still_load(tmp_path):
    model, _ = tiny_model("GPT2LMHeadModel")
    stats = profile_model(model, _windows(), CONFIG)
    path = tmp_path / "old.safetensors"
    _save_format_1(stats, path)
    assert "layer.0.gram_in" in load_file_raw(path)
    loaded = load_stats(path)
    assert torch.equal(loaded.layers[0].gram_in, stats.layers[0].gram_in)


def test_damaged_packed_gram_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_model("LlamaForCausalLM")
    path = save_stats(profile_model(model, _windows(), CONFIG), tmp_path / "s.safetensors")
    tensors = load_file_raw(path)
    tensors["layer.0.gram_hidden_tril"] = tensors["layer.0.gram_hidden_tril"][:-1]
    save_file(tensors, str(path), metadata={"format": "ffsplit-stats", "format_version": "2"})
    for packed in (False, True):
        with pytest.raises(FFSplitError, match="gram_hidden_tril .*not a packed triangle"):
            load_stats(path, packed=packed)
