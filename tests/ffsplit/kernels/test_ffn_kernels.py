"""Decode kernels against the torch path of the same fused FFN.

On a GPU they run compiled (bf16); without one, under Triton's CPU interpreter (fp16: the
interpreter has no bf16 arithmetic). Skipped where Triton is not installed (it is optional), and
under the interpreter with numpy >= 2.3, which Triton 3.6's interpreter cannot index with.
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

from ffsplit.models.tiny import tiny_model  # noqa: E402
from ffsplit.split import dense_block  # noqa: E402
from ffsplit.split.fused import fuse_model  # noqa: E402
from tests.ffsplit.split.test_fused import _llama_128, _lowrank, _quant, split_model  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16


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


def _model(architecture):
    model, _ = tiny_model(architecture)
    return model.to(DEVICE, DTYPE)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 7, 16])
@pytest.mark.parametrize("light", ["lowrank", "quant", "dense", "uniform"])
def test_gated_kernels(light, tokens):
    model = _llama_128().to(DEVICE, DTYPE)
    compress = {
        "lowrank": _lowrank(24),
        "quant": _quant(4, 64),
        "dense": dense_block,
        "uniform": _lowrank(40),
    }[light]
    adapter = split_model(model, compress, heavy_ratio=0.0 if light == "uniform" else 0.2)
    for core in _cores(model, adapter):
        _check_core(core, tokens)


@torch.no_grad()
@pytest.mark.parametrize(
    "architecture", ["OPTForCausalLM", "Gemma3ForCausalLM", "BertModel", "GPT2LMHeadModel"]
)
def test_other_activations_and_biases(architecture):
    """ReLU with biases (OPT), GeLU-tanh gated (Gemma), exact GeLU with biases (BERT), GPT-2."""
    model = _model(architecture)
    adapter = split_model(model, _lowrank(6))
    for core in _cores(model, adapter):
        _check_core(core, 3)


@torch.no_grad()
def test_chain_accumulates_from_zero_every_call():
    """The hidden columns the chain adds into are zeroed by the first kernel on every call."""
    model = _llama_128().to(DEVICE, DTYPE)
    adapter = split_model(model, _lowrank(24), heavy_ratio=0.2)
    core = _cores(model, adapter)[0]
    x = torch.randn(2, core.d).to(DEVICE, DTYPE)
    first = core._last_kernels(core._first_kernels(x))
    second = core._last_kernels(core._first_kernels(x))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
