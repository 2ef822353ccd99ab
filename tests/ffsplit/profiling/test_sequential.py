"""Profiling by layer groups equals profiling the whole model, and a group holds only its layers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.loading import load_model
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_config
from ffsplit.profiling import profile_model
from ffsplit.profiling.sequential import (
    capture_layer_inputs,
    count_layers,
    join_layer_groups,
    layer_groups,
    load_embedding_stage,
    load_layer_group,
    load_layer_inputs,
    profile_by_layer_groups,
    run_layer_group,
    save_layer_inputs,
)

# 24-token windows: longer than Gemma 3's tiny sliding window (16), so its sliding and global layers
# get different masks; 7 windows in batches of 3 leave a smaller last batch.
CONFIG = ProfileConfig(tokens=7 * 24, window=24, batch_size=3, hit_top_fraction=0.05)
LAYERS = 3


def _windows(n=7, t=24, seed=0):
    return torch.randint(0, 150, (n, t), generator=torch.Generator().manual_seed(seed))


def _save_tiny(architecture, folder, layers=LAYERS, **overrides):
    """A tiny random model with `layers` layers, saved as a HF safetensors folder."""
    import transformers

    config = tiny_config(architecture)
    pattern = getattr(config, "layer_types", None)
    config.num_hidden_layers = layers
    if pattern:  # Gemma 3 alternates sliding and global attention; keep the pattern
        config.layer_types = (list(pattern) * layers)[:layers]
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, architecture)(config).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    cache = {}

    def get(architecture):
        if architecture not in cache:
            cache[architecture] = _save_tiny(architecture, tmp_path_factory.mktemp(architecture))
        return cache[architecture]

    return get


def _assert_stats_equal(groups, whole):
    assert sorted(groups.layers) == sorted(whole.layers)
    for i, s in whole.layers.items():
        g = groups.layers[i]
        assert g.tokens == s.tokens
        assert torch.equal(g.hits, s.hits), f"layer {i} hits"
        torch.testing.assert_close(g.sum_sq, s.sum_sq, rtol=1e-6, atol=0)
        torch.testing.assert_close(g.max_abs, s.max_abs, rtol=1e-6, atol=0)
        torch.testing.assert_close(g.gram_in, s.gram_in, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.gram_hidden, s.gram_hidden, rtol=1e-5, atol=1e-6)


def _resident_bytes(model, prefix=""):
    """Bytes of materialised (non-meta) parameters and buffers whose names start with prefix."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(prefix) and not t.is_meta and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_layer_groups_equal_whole_model(architecture, group_size, tiny_folders, tmp_path):
    folder = tiny_folders(architecture)
    windows = _windows()
    whole_model, _, _ = load_model(folder)
    whole = profile_model(whole_model, windows, CONFIG)
    groups = profile_by_layer_groups(folder, windows, CONFIG, group_size, work_dir=tmp_path)
    _assert_stats_equal(groups, whole)
    assert groups.meta["tokens"] == whole.meta["tokens"] == 7 * 24
    expected = [[first, last] for first, last in layer_groups(LAYERS, group_size)]
    assert groups.meta["layer_groups"] == expected
    # every hand-off went through a file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"layer-inputs-{first}.safetensors" for first, _ in layer_groups(LAYERS, group_size)
    ]


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_capture_from_embedding_stage_equals_capture_from_whole_model(architecture, tiny_folders):
    folder = tiny_folders(architecture)
    whole_model, _, _ = load_model(folder)
    layers_before = list(whole_model.modules())
    from_whole = capture_layer_inputs(whole_model, _windows(), batch_size=3)
    assert list(whole_model.modules()) == layers_before  # the layers were put back
    from_stage = capture_layer_inputs(load_embedding_stage(folder), _windows(), batch_size=3)
    assert from_stage.calls == from_whole.calls
    assert [h.shape[0] for h in from_stage.hidden] == [3, 3, 1]
    for a, b in zip(from_stage.hidden, from_whole.hidden, strict=True):
        assert torch.equal(a, b)
    assert from_stage.tensors.keys() == from_whole.tensors.keys()
    for name, t in from_stage.tensors.items():
        assert torch.equal(t, from_whole.tensors[name])
    # the hidden states entering layer 0 are what the model's own forward hands layer 0
    hidden = whole_model(input_ids=_windows()[:3], output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(from_stage.hidden[0], hidden, rtol=0, atol=0)


def test_gemma3_sliding_and_global_layers_get_their_own_arguments(tiny_folders):
    inputs = capture_layer_inputs(
        load_embedding_stage(tiny_folders("Gemma3ForCausalLM")), _windows()
    )
    sliding, full = inputs.calls[0][0]["kwargs"], inputs.calls[0][1]["kwargs"]
    assert sliding["position_embeddings"] != full["position_embeddings"]  # rope theta per type
    mask = inputs.tensors[sliding["attention_mask"]["tensor"]]
    assert mask.dtype == torch.bool and not mask[0, 0, -1, 0]  # 24 tokens, window 16
    assert inputs.calls[0][2] == inputs.calls[0][0]  # layer 2 is sliding again


def test_layer_inputs_round_trip_through_a_file(tiny_folders, tmp_path):
    stage = load_embedding_stage(tiny_folders("Gemma3ForCausalLM"))
    inputs = capture_layer_inputs(stage, _windows(), batch_size=3)
    path = save_layer_inputs(inputs, tmp_path / "inputs.safetensors")
    loaded = load_layer_inputs(path)
    assert (loaded.layer, loaded.num_layers, loaded.calls) == (0, LAYERS, inputs.calls)
    assert all(torch.equal(a, b) for a, b in zip(loaded.hidden, inputs.hidden, strict=True))
    assert loaded.tensors.keys() == inputs.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in inputs.tensors.items())
    assert (loaded.tokens, loaded.windows, loaded.window) == (7 * 24, 7, 24)


def test_handed_on_inputs_drop_what_finished_layers_needed(tiny_folders):
    folder = tiny_folders("LlamaForCausalLM")
    inputs = capture_layer_inputs(load_embedding_stage(folder), _windows(), batch_size=3)
    stats, after = run_layer_group(load_layer_group(folder, 0, 1), 0, 1, inputs, CONFIG)
    assert sorted(stats.layers) == [0, 1] and stats.meta["layers"] == [0, 1]
    assert after.layer == 2 and all(sorted(c) == [2] for c in after.calls)
    whole_model, _, _ = load_model(folder)
    hidden = whole_model(input_ids=_windows()[:3], output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(after.hidden[0], hidden, rtol=0, atol=0)


def test_group_holds_only_its_layers(tmp_path):
    """The memory cap: a group's resident bytes are its layers' bytes, group_size/num_layers of the stack."""
    layers, group = 6, 2
    folder = _save_tiny("LlamaForCausalLM", tmp_path / "llama6", layers=layers)
    whole, _, _ = load_model(folder)
    total = _resident_bytes(whole)
    stack = _resident_bytes(whole, "model.layers.")
    for first, last in layer_groups(layers, group):
        model = load_layer_group(folder, first, last)
        own = sum(_resident_bytes(model, f"model.layers.{i}.") for i in range(first, last + 1))
        assert _resident_bytes(model) == own == stack * group // layers
        assert own <= total * group / layers
        for i in set(range(layers)) - set(range(first, last + 1)):
            assert all(p.is_meta for p in model.model.layers[i].parameters())
    stage = load_embedding_stage(folder)
    assert _resident_bytes(stage, "model.layers.") == 0
    assert stage.lm_head.weight.is_meta  # the LM head runs after the layers: never loaded
    assert _resident_bytes(stage) < total - stack


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM", "BertModel"])
def test_recomputed_buffers_equal_the_loaded_model(architecture, tiny_folders):
    """Rotary inv_freq, Gemma's embed_scale, BERT's position ids are not in the checkpoint."""
    folder = tiny_folders(architecture)
    whole_model, _, _ = load_model(folder)
    reference = dict(whole_model.named_buffers())
    stage = load_embedding_stage(folder)
    buffers = {n: b for n, b in stage.named_buffers() if not b.is_meta}
    assert buffers
    for name, buffer in buffers.items():
        assert torch.equal(buffer, reference[name]), name


def test_groups_must_run_in_order_on_loaded_layers(tiny_folders, tmp_path):
    folder = tiny_folders("OPTForCausalLM")
    inputs = capture_layer_inputs(load_embedding_stage(folder), _windows())
    with pytest.raises(FFSplitError, match="enter layer 0, not 1"):
        run_layer_group(load_layer_group(folder, 1, 2), 1, 2, inputs, CONFIG)
    with pytest.raises(FFSplitError, match="layer 1 has no weights"):
        run_layer_group(load_layer_group(folder, 0, 0), 0, 1, inputs, CONFIG)
    with pytest.raises(FFSplitError, match="not within the model's 3 layers"):
        load_layer_group(folder, 2, 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(FFSplitError, match="bad.safetensors"):
        load_layer_inputs(bad)


def test_layer_group_helpers(tiny_folders):
    assert layer_groups(5, 2) == [(0, 1), (2, 3), (4, 4)]
    assert layer_groups(3, 10) == [(0, 2)]
    with pytest.raises(FFSplitError, match="group size"):
        layer_groups(3, 0)
    assert count_layers(tiny_folders("GPT2LMHeadModel")) == LAYERS
    folder = tiny_folders("GPTNeoXForCausalLM")
    inputs = capture_layer_inputs(load_embedding_stage(folder), _windows())
    model = load_layer_group(folder, 0, 1)
    stats, _ = run_layer_group(model, 0, 1, inputs, CONFIG)
    with pytest.raises(FFSplitError, match="overlap at layers \\[0, 1\\]"):
        join_layer_groups([stats, stats])
    with pytest.raises(FFSplitError, match="no layer group"):
        join_layer_groups([])


# ---- real model ------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from ffsplit.config import ProfileConfig
    from ffsplit.models.loading import load_model
    from ffsplit.profiling import profile_model
    from ffsplit.profiling.sequential import load_layer_group, load_layer_inputs, run_layer_group

    def peak_mib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    folder, inputs_path, mode = sys.argv[1:4]
    config = ProfileConfig(tokens=512, window=128, batch_size=4)
    if mode == "group":  # one pipeline task: the inputs file in, layers 10..19 loaded
        inputs = load_layer_inputs(inputs_path)
        baseline = peak_mib()
        run_layer_group(load_layer_group(folder, 10, 19), 10, 19, inputs, config)
    else:
        windows = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
        baseline = peak_mib()
        profile_model(load_model(folder)[0], windows, config)
    print(json.dumps({"baseline_mib": round(baseline), "peak_mib": round(peak_mib())}))
    """
)


def _peak(folder, inputs_path, mode):
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(folder), str(inputs_path), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_smollm2_by_groups_of_ten_equals_whole_and_peaks_lower(tmp_path, capsys):
    from ffsplit.models.registry import resolve_model

    folder = resolve_model("smollm2-135m").path
    config = ProfileConfig(tokens=512, window=128, batch_size=4)
    windows = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    whole = profile_model(load_model(folder)[0], windows, config)
    groups = profile_by_layer_groups(folder, windows, config, group_size=10, work_dir=tmp_path)
    assert groups.meta["layer_groups"] == [[0, 9], [10, 19], [20, 29]]
    _assert_stats_equal(groups, whole)

    group = _peak(folder, tmp_path / "layer-inputs-10.safetensors", "group")
    full = _peak(folder, "", "full")
    with capsys.disabled():
        print(f"\nSmolLM2 peak RSS (MiB): group of 10 layers {group}, whole model {full}")
    group_rise = group["peak_mib"] - group["baseline_mib"]
    full_rise = full["peak_mib"] - full["baseline_mib"]
    # fp32: 10 of 30 layers are ~405 MiB / 3; the whole model ~515 MiB plus its logits
    assert 0 < group_rise < 0.5 * full_rise
