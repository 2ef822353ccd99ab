"""Decode kernels against the torch path of the same fused FFN.

On a GPU they run compiled (bf16); without one, under Triton's CPU interpreter (fp16: the
interpreter has no bf16 arithmetic). Skipped where Triton is not installed (it is optional), and
under the interpreter with numpy >= 2.3, which Triton 3.6's interpreter cannot index with.
Tokens 1 take the one-token (register GEMV) kernels, 2-16 the tensor-core ones; SPLIT > 1 the
split-K path (partial sums, arrival counters, the last slice reduces).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
os.environ.setdefault("FFSPLIT_KERNEL_AUTOTUNE", "0")  # one fixed tile: fast tests
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
numpy = pytest.importorskip("numpy")
if not CUDA and tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
    pytest.skip("Triton's interpreter needs numpy < 2.3", allow_module_level=True)
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the interpreter is off", allow_module_level=True)

from ffsplit.kernels import ffn  # noqa: E402
from ffsplit.models.tiny import tiny_model  # noqa: E402
from ffsplit.split import dense_block  # noqa: E402
from ffsplit.split.fused import fuse_model  # noqa: E402
from tests.ffsplit.split.test_fused import _llama_128, _lowrank, _quant, split_model  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16
COMPRESS = {
    "lowrank": _lowrank(24),
    "quant": _quant(4, 64),
    "dense": dense_block,
    "uniform": _lowrank(40),
}


@pytest.fixture
def tiles(monkeypatch):
    """Set the fixed tiles of first/last/chain for one test: (BLOCK_N, BLOCK_K, SPLIT) and
    (BLOCK_N, BLOCK_R) tuples, or whole launch meta dicts."""
    names = {"first": ("BLOCK_N", "BLOCK_K", "SPLIT"), "last": ("BLOCK_N", "BLOCK_K", "SPLIT")}
    names["chain"] = ("BLOCK_N", "BLOCK_R")

    def use(first=None, last=None, chain=None):
        fixed = dict(ffn._FIXED)
        for name, tile in (("first", first), ("last", last), ("chain", chain)):
            if tile is not None:
                fixed[name] = (
                    tile if isinstance(tile, dict) else dict(zip(names[name], tile, strict=True))
                )
        monkeypatch.setattr(ffn, "_FIXED", fixed)

    return use


def _cores(model, adapter):
    fuse_model(model, adapter, strict=True, verify=False)
    out = []
    for module in model.modules():
        core = getattr(module, "core", None)
        if core is not None and core not in out:
            out.append(core)
    return out


def _check_core(core, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, core.d, generator=gen).to(DEVICE, DTYPE)
    hidden_ref = core._first_torch(x).float()
    reference = core._last_torch(hidden_ref).float()
    hidden = core._first_kernels(x)
    assert hidden.dtype == torch.float32 and hidden.shape == hidden_ref.shape
    h_err = ((hidden - hidden_ref).norm() / hidden_ref.norm()).item()
    y = core._last_kernels(hidden).float()
    y_err = ((y - reference).norm() / reference.norm()).item()
    assert torch.isfinite(y).all()
    assert h_err < 1e-2 and y_err < 1e-2, (h_err, y_err)
    _assert_counters_at_rest()


def _assert_counters_at_rest():
    """Every split-K launch leaves its arrival counters zero (the next launch relies on it)."""
    for key, counters in ffn._counters.items():
        assert int(counters.abs().sum()) == 0, key


def _model(architecture):
    model, _ = tiny_model(architecture)
    return model.to(DEVICE, DTYPE)


def _llama(hidden, intermediate, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(DEVICE, DTYPE)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("light", ["lowrank", "quant", "dense", "uniform"])
def test_gated_kernels(light, tokens, split, tiles):
    tiles(first=(32, 128, split), last=(32, 128, split))
    model = _llama_128().to(DEVICE, DTYPE)
    adapter = split_model(model, COMPRESS[light], heavy_ratio=0.0 if light == "uniform" else 0.2)
    for core in _cores(model, adapter):
        _check_core(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("light", ["lowrank", "dense"])
def test_odd_shapes(light, tokens, tiles):
    """d = 200 (a partial K tile, an empty slice of 4), 344 neurons, rank 21: every bound masked."""
    tiles(first=(16, 64, 4), last=(16, 64, 4), chain=(16, 32))
    model = _llama(200, 344)
    compress = {"lowrank": _lowrank(21), "dense": dense_block}[light]
    adapter = split_model(model, compress, heavy_ratio=0.13)
    for core in _cores(model, adapter):
        _check_core(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_int4_uneven_slices(tokens, tiles):
    """d = 192: three int4 groups of 64 for two `first` slices (two groups, one); 300 light
    neurons: `last` steps of 256 neurons (two blocks of 128), one per slice, the second partial."""
    tiles(first=(16, 128, 2), last=(16, 256, 2))
    model = _llama(192, 344)
    adapter = split_model(model, _quant(4, 64), heavy_ratio=0.13)
    for core in _cores(model, adapter):
        _check_core(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize(
    "architecture", ["OPTForCausalLM", "Gemma3ForCausalLM", "BertModel", "GPT2LMHeadModel"]
)
@pytest.mark.parametrize("tokens", [1, 3])
def test_other_activations_and_biases(architecture, tokens):
    """ReLU with biases (OPT), GeLU-tanh gated (Gemma), exact GeLU with biases (BERT), GPT-2."""
    model = _model(architecture)
    adapter = split_model(model, _lowrank(6))
    for core in _cores(model, adapter):
        _check_core(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 2])
def test_chain_accumulates_from_zero_every_call(tokens):
    """The hidden columns the chain adds into are zeroed by the first kernel on every call, and
    the split-K counters start from zero on every call."""
    model = _llama_128().to(DEVICE, DTYPE)
    adapter = split_model(model, _lowrank(24), heavy_ratio=0.2)
    core = _cores(model, adapter)[0]
    x = torch.randn(tokens, core.d).to(DEVICE, DTYPE)
    first = core._last_kernels(core._first_kernels(x))
    second = core._last_kernels(core._first_kernels(x))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    _assert_counters_at_rest()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter takes over 10 minutes)")
@torch.no_grad()
@pytest.mark.parametrize("mode", ["one", "tile"])
@pytest.mark.parametrize("light", ["lowrank", "quant"])
def test_every_tuned_tile(light, mode, tiles):
    """Each tile the autotuner may pick, on a 7B-like aspect (d 512, 1376 neurons), at 1 token
    ("one") and 16 ("tile"): autotuning keeps whichever is fastest, so every one must be right."""
    model = _llama(512, 1376)
    compress = {"lowrank": _lowrank(96), "quant": _quant(4, 128)}[light]
    adapter = split_model(model, compress, heavy_ratio=0.1)
    core = _cores(model, adapter)[0]

    def meta(name, tile):
        return {**ffn._tile_meta(name, tile), "num_warps": tile[-2], "num_stages": tile[-1]}

    chains = ffn._TILES["chain", mode]
    pairs = zip(ffn._TILES["first", mode], ffn._TILES["last", mode], strict=True)
    for i, (first, last) in enumerate(pairs):
        chain = chains[i % len(chains)]
        tiles(first=meta("first", first), last=meta("last", last), chain=meta("chain", chain))
        _check_core(core, 1 if mode == "one" else 16, seed=i)


@torch.no_grad()
@pytest.mark.parametrize("light", ["lowrank", "quant"])
def test_one_token_through_tensor_core_tiles(light, tiles):
    """At one token the tuner may also pick the 16-row tensor-core tiles (row 0 used)."""
    tile = {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 2}
    tiles(first=tile, last=tile, chain={"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_R": 32})
    model = _llama_128().to(DEVICE, DTYPE)
    adapter = split_model(model, COMPRESS[light], heavy_ratio=0.2)
    for core in _cores(model, adapter):
        _check_core(core, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs a GPU (sm_90+)")
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16])
def test_programmatic_dependent_launch_in_a_graph(tokens, monkeypatch):
    """Three FFNs back to back (each kernel reads the previous one's output), launched with
    programmatic dependent launch and L2 prefetch, captured in a CUDA graph and replayed: the same
    outputs as plain launches, replay after replay (chain atomics: bf16 rounding tolerance)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    model = _llama(512, 1376, layers=3)
    adapter = split_model(model, _lowrank(96), heavy_ratio=0.1)
    cores = _cores(model, adapter)
    assert len(cores) == 3

    def ffns(x):
        for core in cores:
            x = core._last_kernels(core._first_kernels(x)).to(x.dtype)
        return x

    x = torch.randn(tokens, 512, device="cuda", dtype=DTYPE)
    monkeypatch.setenv("FFSPLIT_KERNEL_PDL", "0")
    assert ffn._launch_options("chain", x.device) == {
        "PDL": False,
        "launch_pdl": False,
        "PREFETCH": 0,
    }
    plain = ffns(x).float()
    monkeypatch.setenv("FFSPLIT_KERNEL_PDL", "1")
    assert ffn._launch_options("last", x.device)["PDL"] is True
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = ffns(x).float()
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(eager, plain, rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ffns(x)
    for i in range(20):
        x.copy_(torch.randn(tokens, 512, generator=torch.Generator().manual_seed(i)).to(x))
        graph.replay()
        monkeypatch.setenv("FFSPLIT_KERNEL_PDL", "0")
        expected = ffns(x).float()
        monkeypatch.setenv("FFSPLIT_KERNEL_PDL", "1")
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    _assert_counters_at_rest()
