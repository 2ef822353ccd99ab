"""The fused execution form computes what the split model computes (CPU: torch path; GPU: kernels)."""

import os

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.quant import quantize_groups
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.split import BlockParts, build_split, dense_block, swap_ffn
from ffsplit.split.fused import (
    FusedFFN,
    FusedFirst,
    FusedLast,
    activation_name,
    fuse_model,
)
from ffsplit.split.parts import LowRankLinear, QuantizedLinear
from ffsplit.split.qformat import dequantize

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _lowrank(rank):
    def factor(w, bias=None):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = min(rank, s.numel())
        return LowRankLinear((u[:, :r] * s[:r]).to(w.dtype), vh[:r].to(w.dtype), bias)

    def compress(block, neurons):
        gate = None if block.gate is None else factor(block.gate, block.gate_bias)
        return BlockParts(factor(block.up, block.up_bias), gate, factor(block.down))

    return compress


def _quant(bits, group):
    def rows(w, bias=None):
        return QuantizedLinear(quantize_groups(w.float(), bits, group), False, bias)

    def compress(block, neurons):
        gate = None if block.gate is None else rows(block.gate, block.gate_bias)
        down = QuantizedLinear(quantize_groups(block.down.t().float(), bits, group), True)
        return BlockParts(rows(block.up, block.up_bias), gate, down)

    return compress


def split_model(model, light, heavy_ratio=0.25, seed=0):
    """Split every FFN: a random heavy block kept dense, the rest through `light` (None = pruned)."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        perm = torch.randperm(w.neurons, generator=gen)
        k = int(heavy_ratio * w.neurons)
        blocks = [(perm[:k], dense_block)]
        if light is not None:
            blocks.append((perm[k:], light))
        swap_ffn(model, adapter, handle, build_split(w, blocks))
    return adapter


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(shape=(2, 9)):
    return torch.randint(0, 150, shape, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("light", ["lowrank", "dense", "pruned", "uniform"])
def test_fused_equals_split_model(architecture, light):
    model, _ = tiny_model(architecture)
    if light == "uniform":
        adapter = split_model(model, _lowrank(7), heavy_ratio=0.0)
    else:
        compress = {"lowrank": _lowrank(5), "dense": dense_block, "pruned": None}[light]
        adapter = split_model(model, compress)
    ids = _ids()
    reference = _outputs(model, ids)
    report = fuse_model(model, adapter, strict=True)
    assert len(report.fused) == len(adapter.ffns(model)) and not report.skipped
    fused = _outputs(model, ids)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    kinds = {type(m) for m in model.modules()}
    assert FusedFFN in kinds or {FusedFirst, FusedLast} <= kinds


@torch.no_grad()
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"])
def test_fused_dense_model_and_generate(architecture):
    """An unsplit model fuses too (gate and up in one GEMM): the 'dense fused' baseline."""
    model, _ = tiny_model(architecture)
    ids = _ids((1, 5))
    reference = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    logits = _outputs(model, ids)
    fuse_model(model, strict=True)
    torch.testing.assert_close(_outputs(model, ids), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), reference
    )


def _llama_128():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=160,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_fused_int4_light_equals_split_model():
    model = _llama_128()
    adapter = split_model(model, _quant(4, 64), heavy_ratio=0.2)
    ids = _ids()
    reference = _outputs(model, ids)
    report = fuse_model(model, adapter, strict=True)
    assert report.fused[0].light == "quant" and report.fused[0].bits == 4
    torch.testing.assert_close(_outputs(model, ids), reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_unsupported_split_is_left_on_reference_path():
    """Quantized parts of one FFN with two group sizes have no fused form: left as they are."""
    model = _llama_128()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        perm = torch.randperm(w.neurons, generator=gen)
        blocks = [(perm[:100], _quant(4, 64)), (perm[100:], _quant(4, 32))]
        swap_ffn(model, adapter, handle, build_split(w, blocks))
    ids = _ids()
    reference = _outputs(model, ids)
    with pytest.warns(UserWarning, match="reference path"):
        report = fuse_model(model, adapter)
    assert set(report.skipped) == {0, 1} and "group size" in report.skipped[0]
    torch.testing.assert_close(_outputs(model, ids), reference)


@torch.no_grad()
def test_column_outlier_ffns_are_left_on_reference_path():
    """The column-outlier baseline has no fused form: load_variant's fuse_model on CUDA leaves its
    FFNs as they are (reported, warned), never fails."""
    from ffsplit.compress.recipe import compress_model
    from ffsplit.config import ProfileConfig, QuantConfig, Recipe
    from ffsplit.profiling import profile_model

    model, _ = tiny_model("LlamaForCausalLM")
    windows = torch.randint(0, 150, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = profile_model(model, windows, ProfileConfig(tokens=64, window=16, batch_size=2))
    method = QuantConfig(group_size=32, allocation="two-level")
    compress_model(model, stats, Recipe(method=method, selection="outlier", ffn_reduction=0.7))
    adapter = get_adapter(model)
    ids = _ids()
    reference = _outputs(model, ids)
    with pytest.warns(UserWarning, match="reference path"):
        report = fuse_model(model, adapter)
    assert not report.fused and set(report.skipped) == {0, 1}
    assert "column-outlier parts" in report.skipped[0]
    assert torch.equal(_outputs(model, ids), reference)


@torch.no_grad()
@pytest.mark.parametrize("bits", [3, 8])
def test_fused_quant_widths_and_int8_heavy_equal_split_model(bits):
    """Any width (here 3 and 8) and a heavy block at int8 fuse to the quantized core."""
    model = _llama_128()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        perm = torch.randperm(w.neurons, generator=gen)
        blocks = [(perm[:64], _quant(8, 64)), (perm[64:], _quant(bits, 64))]
        swap_ffn(model, adapter, handle, build_split(w, blocks))
    ids = _ids()
    reference = _outputs(model, ids)
    report = fuse_model(model, adapter, strict=True)
    assert report.fused[0].light == "quant" and report.fused[0].heavy == 0
    torch.testing.assert_close(_outputs(model, ids), reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_every_width_of_the_layer_allocation_fuses_in_one_ffn():
    """The quant recipe's default (layer allocation) gives one FFN bf16 neurons and up to six
    widths: all of them fuse (the kernels run them in launches of three segments)."""
    model = _llama_128()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    widths = [8, 6, 5, 4, 3, 2]
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        perm = torch.randperm(w.neurons, generator=gen)
        cuts = perm.tensor_split(len(widths) + 1)
        blocks = [(cuts[0], dense_block)] + [
            (idx, _quant(b, 64)) for idx, b in zip(cuts[1:], widths, strict=True)
        ]
        swap_ffn(model, adapter, handle, build_split(w, blocks))
    ids = _ids()
    reference = _outputs(model, ids)
    report = fuse_model(model, adapter, strict=True)
    assert not report.skipped and len(report.fused) == len(adapter.ffns(model))
    core = next(m for m in model.modules() if type(m).__name__ == "QuantFFNCore")
    assert sorted(seg[0] for seg in core._segment_meta) == sorted(widths)
    torch.testing.assert_close(_outputs(model, ids), reference, rtol=1e-4, atol=1e-4)


def test_repacked_int4_dequantizes_exactly():
    """The kernels' layouts hold exactly the quantized values of compress/quant.py."""
    model = _llama_128()
    adapter = split_model(model, _quant(4, 64), heavy_ratio=0.2)
    handle = adapter.ffns(model)[0]
    down_part = model.get_submodule(handle.down_path).parts[1]
    up_part = model.get_submodule(handle.up_path).parts[1]
    fuse_model(model, adapter)
    core = model.get_submodule(handle.path).core
    light = slice(core.m_heavy, core.m_heavy + down_part.in_features)
    torch.testing.assert_close(
        core.down_weights_t()[light], dequantize(down_part.quantized()), rtol=0, atol=0
    )
    up_rows = core.first_weights()[core.m_total :]  # gate rows of every neuron, then up rows
    torch.testing.assert_close(up_rows[light], dequantize(up_part.quantized()), rtol=0, atol=0)


def test_activation_names():
    from transformers.activations import ACT2FN

    assert activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_name(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert activation_name(ACT2FN["gelu"]) == "gelu"
    assert activation_name(torch.nn.ReLU()) == "relu"
    assert activation_name(torch.nn.Tanh()) is None


@torch.no_grad()
def test_wrong_dataflow_fails_loudly():
    model, _ = tiny_model("LlamaForCausalLM")
    adapter = split_model(model, _lowrank(5))
    adapter.ffn_dataflow = "up_act_down"  # wrong: Llama's FFN is gated
    with pytest.raises(Exception, match="gated"):
        fuse_model(model, adapter)


# ---------------------------------------------------------------------------------------- GPU


def _gpu_model(light):
    """bf16 on the GPU first, then split (a model cast after splitting would cast the int4
    parts' float16 scales too)."""
    os.environ.setdefault("FFSPLIT_KERNEL_AUTOTUNE", "0")  # one fixed tile: fast tests
    model = _llama_128().to(device="cuda", dtype=torch.bfloat16)
    adapter = split_model(model, light, heavy_ratio=0.2)
    return model, adapter


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("light", ["lowrank", "quant", "dense"])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_gpu_fused_matches_reference(light, tokens):
    """bf16 on GPU: fused (Triton at <= 16 tokens, torch ops above) vs the split reference modules,
    relative error <= 2e-2 (bf16 rounding of intermediates differs between the two paths)."""
    compress = {"lowrank": _lowrank(24), "quant": _quant(4, 64), "dense": dense_block}[light]
    model, adapter = _gpu_model(compress)
    ids = torch.randint(0, 150, (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    reference = _outputs(model, ids).float()
    fuse_model(model, adapter, strict=True)
    fused = _outputs(model, ids).float()
    err = ((fused - reference).norm() / reference.norm()).item()
    assert err < 2e-2


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("architecture", ["OPTForCausalLM", "Gemma3ForCausalLM", "BertModel"])
def test_gpu_fused_other_architectures(architecture):
    os.environ.setdefault("FFSPLIT_KERNEL_AUTOTUNE", "0")
    model, _ = tiny_model(architecture)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    adapter = split_model(model, _lowrank(5))
    ids = _ids((1, 4)).cuda()
    reference = _outputs(model, ids).float()
    fuse_model(model, adapter, strict=True)
    err = ((_outputs(model, ids).float() - reference).norm() / reference.norm()).item()
    assert err < 2e-2


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16])
def test_gpu_fused_ffn_captures_in_cuda_graph(tokens):
    """Replays stay right: the split-K counters are reset by every launch inside the graph (the
    chain's fp32 atomics may add in another order: bf16 rounding tolerance)."""
    model, adapter = _gpu_model(_lowrank(24))
    fuse_model(model, adapter, strict=True)
    ffn = model.get_submodule(adapter.ffns(model)[0].path)
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    eager = ffn(x).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ffn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ffn(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, ffn(x), rtol=1e-2, atol=1e-2)
    assert not torch.equal(out, eager)


def test_import_loads_no_triton():
    """ffsplit.kernels is imported lazily: importing and using the torch path needs no Triton."""
    import subprocess
    import sys

    code = (
        "import sys, torch, ffsplit, ffsplit.split.fused as f, ffsplit.kernels;"
        "assert 'triton' not in sys.modules and 'ffsplit.kernels.ffn' not in sys.modules;"
        "assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
