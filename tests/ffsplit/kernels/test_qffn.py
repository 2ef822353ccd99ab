"""Quantized-FFN kernels (ffsplit/kernels/qffn.py) against the reference dequantise-then-matmul.

Every quant variant the recipe writes: heavy bf16 or int8, light widths 2..8 (mixed per FFN as
the budget solver assigns them), gated and plain FFNs, with and without biases. On a GPU the
kernels run compiled (bf16) at 1 and 16 tokens and the prefill path (Triton dequantisation +
cuBLAS) at 128 and 2048; without one the kernels run under Triton's CPU interpreter (fp16, small
shapes, a subset of widths). The reference is float32 math on the exact quantized values
(qlayout's torch dequantisation), so the tolerance covers only 16-bit rounding: relative error
< 1e-2 (measured 2e-4..8e-4 in the interpreter).
"""

import os

import pytest
import torch

from tests.ffsplit.kernels.test_qlayout import CUDA, DEVICE, DTYPE, TOL, fused_core, rel

# ---------------------------------------------------------------------------------- kernels

triton = pytest.importorskip("triton")
os.environ.setdefault("FFSPLIT_KERNEL_AUTOTUNE", "0")  # fixed tiles: fast, deterministic tests
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = not CUDA
if INTERPRETER:
    numpy = pytest.importorskip("numpy")
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("Triton's interpreter needs numpy < 2.3", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the interpreter is off", allow_module_level=True)

# On the CPU interpreter a subset (each case takes seconds there); on a GPU all of them.
WIDTHS = [2, 3, 4, 8] if INTERPRETER else [2, 3, 4, 5, 6, 7, 8]
MIXES = [  # (heavy, light ranges): what the budget solver writes
    ((32, 16), [(48, 4), (48, 3)]),  # heavy bf16, light int4/int3
    ((16, 8), [(64, 4), (48, 3)]),  # heavy int8, light int4/int3
    ((32, 16), [(96, 8)]),  # heavy bf16, light int8
    ((0, 16), [(160, 4)]),  # uniform int4 (no split)
    ((16, 16), [(48, 8), (48, 4), (48, 3)]),  # three widths (two light + a heavy int8 range)
    # the layer allocation's six quantized widths beside bf16: two launches a stage
    ((16, 16), [(16, 8), (32, 6), (16, 5), (48, 4), (32, 3), (16, 2)]),
]


def _counters_at_rest():
    from ffsplit.kernels import qffn

    for key, counters in qffn._counters.items():
        assert int(counters.abs().sum()) == 0, key


def check_kernels(core, tokens, seed=0):
    """Both decode stages against the float32 reference on the same quantized values."""
    x = torch.randn(tokens, core.d, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)
    hidden_ref = core._first_reference(x.float())
    want = core._last_reference(hidden_ref)
    hidden = core._first_kernels(x)
    assert hidden.dtype == torch.float32 and hidden.shape == hidden_ref.shape
    assert torch.isfinite(hidden).all()
    y = core._last_kernels(hidden)
    assert y.dtype == DTYPE and torch.isfinite(y).all()
    assert rel(hidden, hidden_ref) < TOL and rel(y, want) < TOL, (
        rel(hidden, hidden_ref),
        rel(y, want),
    )
    _counters_at_rest()


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bits", WIDTHS)
def test_every_width(bits, gated, tokens):
    if INTERPRETER and not gated and bits not in (3, 4):
        pytest.skip("interpreter: plain FFNs at 3 and 4 bits only")
    core, _ = fused_core((32, 16), [(96, bits)], gated, bias=not gated)
    check_kernels(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_mixed_widths(mix, tokens):
    if INTERPRETER and tokens == 3:
        pytest.skip("interpreter: 1 and 16 tokens")
    heavy, light = MIXES[mix]
    core, _ = fused_core(heavy, light, gated=True)
    assert len(core.segments()) == len({b for _, b in light} | ({heavy[1]} - {16}))
    check_kernels(core, tokens, seed=mix)


@torch.no_grad()
@pytest.mark.parametrize("group", [32, 128])
def test_other_groups(group):
    """Groups smaller than a unit run (32 codes of 16 per unit at 2 bits) and larger than a step."""
    core, _ = fused_core((16, 16), [(64, 2), (64, 4)], gated=True, d=256, group=group)
    check_kernels(core, 1)
    check_kernels(core, 16)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16])
def test_every_tile_shape(tokens, monkeypatch):
    """Other tiles than the default (splits 1, 2, 4; every tile path at 16 tokens; group_dot 2,
    the 16-bit unpack of 4-bit codes, at 1 token too, where it runs the GEMV as a 16-row tile)."""
    core, _ = fused_core((32, 16), [(64, 4), (64, 3)], gated=True, d=256)
    choices = [
        "16,64,1,2,4,0",
        "32,128,2,2,4,1",
        "16,128,4,2,4,1",
        "32,128,2,2,4,2",
        "16,64,4,2,4,2",
    ]
    for i, first in enumerate(choices):
        last = ["16,32,1,2,4", "32,64,2,2,4", "16,64,4,2,4", "32,64,2,2,4,2", "16,32,1,2,4,2"][i]
        mode = "one" if tokens == 1 else "tile"
        monkeypatch.setenv("FFSPLIT_QTILES", f"first/{mode}={first};last/{mode}={last}")
        check_kernels(core, tokens, seed=i)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [40] if INTERPRETER else [128, 2048])
@pytest.mark.parametrize("gated", [True, False])
def test_prefill_path(tokens, gated, monkeypatch):
    """Above 16 tokens: Triton dequantisation into the scratch buffer (in chunks) + GEMMs."""
    from ffsplit.kernels import qffn

    monkeypatch.setenv("FFSPLIT_PREFILL_CHUNK", "32")  # several chunks per segment
    core, _ = fused_core((32, 16), [(64, 4), (64, 3)], gated, bias=not gated)
    x = torch.randn(tokens, core.d, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    want = core._last_reference(core._first_reference(x.float()))
    tensors, ints = core._op_args()
    segments = qffn.segments_from(tensors, ints)
    hidden = qffn.prefill_first(
        x,
        core.w_dense,
        core.bias_first,
        segments,
        gated=gated,
        act_fn=core.act_module,
        m_total=core.m_total,
        group=core.group,
    )
    y = qffn.prefill_last(hidden, core.w_down_t, core.b3, segments, d=core.d, group=core.group)
    assert rel(y, want) < TOL


# ----------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16, 128, 2048])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_gpu_forward_matches_split_modules(mix, gated, tokens):
    """The fused module's own forward (kernels up to 16 tokens, prefill path above) against the
    split modules it replaces (each dequantises to bf16 and multiplies: the reference path)."""
    heavy, light = MIXES[mix]
    core, (up, gate, down, act) = fused_core(heavy, light, gated, d=256, bias=not gated)
    x = torch.randn(tokens, 256, device="cuda", dtype=DTYPE)
    want = down(act(gate(x)) * up(x)) if gated else down(act(up(x)))
    assert rel(core(x), want) < TOL


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16])
def test_gpu_cuda_graph_replays(tokens):
    """Captured in a CUDA graph and replayed on new inputs: the same as eager launches (split-K
    counters are left at rest by every launch inside the graph)."""
    core, _ = fused_core((32, 16), [(64, 4), (64, 3)], gated=True, d=256)
    x = torch.randn(tokens, 256, device="cuda", dtype=DTYPE)
    core(x)  # warm-up: compile, counters allocated
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = core(x)
    for i in range(3):
        x.copy_(torch.randn(tokens, 256, generator=torch.Generator().manual_seed(i)).to(x))
        graph.replay()
        torch.testing.assert_close(out, core(x), rtol=1e-2, atol=1e-2)
    _counters_at_rest()


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_gpu_torch_compile_traces_the_ops():
    """torch.compile(fullgraph) sees the two custom ops and no graph break."""
    core, _ = fused_core((32, 16), [(64, 4), (64, 3)], gated=True, d=256)
    x = torch.randn(1, 256, device="cuda", dtype=DTYPE)
    compiled = torch.compile(core, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), core(x), rtol=1e-2, atol=1e-2)
