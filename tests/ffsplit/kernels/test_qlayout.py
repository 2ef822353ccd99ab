"""Kernel layouts of quantized FFNs (ffsplit/kernels/qlayout.py) and the fused core's torch path.

No Triton needed: the units hold exactly the stored codes and bytes, and the fused core's
reference path (dequantise, matmul) equals the split modules for every width. The kernels are
tested against this reference in test_qffn.py. Builders here are shared with it.
"""

import pytest
import torch

from ffsplit.compress.quant import quantize_groups
from ffsplit.kernels import qlayout
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import DenseLinear, QuantizedLinear
from ffsplit.split.qformat import pack_bits

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16
TOL = 1e-2


# ----------------------------------------------------------------------------- layout (no Triton)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_units_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (6, 256), generator=gen, dtype=torch.uint8)
    units = qlayout.pack_units(codes, bits)
    assert len(units) == len(qlayout.PLANES[bits])
    assert all(u.shape == (6, 256 // qlayout.CODES_PER_UNIT[bits]) for u in units)
    assert torch.equal(qlayout.unpack_units(units, bits), codes)
    per_unit = qlayout.CODES_PER_UNIT[bits]
    down = [qlayout.group_major(u, 64, per_unit) for u in units]
    assert torch.equal(qlayout.unpack_units([qlayout.row_major(u) for u in down], bits), codes)
    # bytes: exactly the stored bit stream's
    assert sum(u.numel() * u.element_size() for u in units) == 6 * 256 * bits // 8


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_single_plane_units_are_the_stored_stream(bits):
    """2 and 8 bits: the kernel units are qformat's little-endian stream read as int32; 4 bits:
    the stream of the codes with each unit's columns in slot order (pairs 2k, 2k + 1 in slots k,
    k + 4: the halves of a register)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (3, 128), generator=gen, dtype=torch.uint8)
    per_unit = qlayout.CODES_PER_UNIT[bits]
    order = list(qlayout.SLOT_COLUMNS.get(bits, range(per_unit)))
    slotted = codes.view(3, -1, per_unit)[..., order].reshape(-1)
    stream = pack_bits(slotted, bits).view(torch.int32).view(3, -1)
    assert torch.equal(qlayout.pack_units(codes, bits)[0], stream)
    assert (bits == 4) == (order != list(range(per_unit)))
    natural = pack_bits(codes.reshape(-1), bits).view(torch.int32).view(3, -1)
    assert torch.equal(qlayout.units_from_stream(natural, bits), stream)


def test_four_bit_slots_put_neighbouring_columns_16_bits_apart():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8) + 1  # column c holds code c + 1
    unit = int(qlayout.pack_units(codes, 4)[0][0, 0]) & 0xFFFFFFFF
    for k in range(4):
        assert (unit >> (4 * k)) & 0xF == 2 * k + 1  # column 2k
        assert (unit >> (16 + 4 * k)) & 0xF == 2 * k + 2  # column 2k + 1


def test_no_layout_for_one_bit():
    with pytest.raises(Exception, match="supported"):
        qlayout.planes(1)


# ------------------------------------------------------------------------------- FFN builders


def _quant(w, bits, group, neuron_major=False, bias=None):
    part = QuantizedLinear(quantize_groups(w.float(), bits, group), neuron_major)
    if bias is not None:
        part.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return part


def build_ffn(
    heavy: tuple[int, int],
    light: list[tuple[int, int]],
    gated: bool,
    d: int = 128,
    group: int = 64,
    bias: bool = False,
    seed: int = 0,
):
    """Split projections of a random FFN: ``heavy = (neurons, bits)`` (bits 16 = dense, 8 =
    int8), then light ranges ``(neurons, bits)``. Returns (up, gate, down, activation)."""
    gen = torch.Generator().manual_seed(seed)
    m = heavy[0] + sum(n for n, _ in light)
    w_up = torch.randn(m, d, generator=gen) / d**0.5
    w_gate = torch.randn(m, d, generator=gen) / d**0.5
    w_down = torch.randn(d, m, generator=gen) / m**0.5
    b_up = torch.randn(m, generator=gen) * 0.1 if bias else None
    ups, gates, downs, start = [], [], [], 0
    for n, bits in [heavy, *light]:
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        b = None if b_up is None else b_up[rows]
        if bits == 16:
            ups.append(DenseLinear(w_up[rows], b))
            gates.append(DenseLinear(w_gate[rows]))
            downs.append(DenseLinear(w_down[:, rows]))
        else:
            ups.append(_quant(w_up[rows], bits, group, bias=b))
            gates.append(_quant(w_gate[rows], bits, group))
            downs.append(_quant(w_down[:, rows].t(), bits, group, neuron_major=True))
    down_bias = torch.randn(d, generator=gen) * 0.1 if bias else None
    up = SplitOutProjection(ups)
    gate = SplitOutProjection(gates) if gated else None
    act = torch.nn.SiLU() if gated else torch.nn.ReLU()
    return up, gate, SplitInProjection(downs, down_bias), act


def fused_core(heavy, light, gated, **kw):
    from ffsplit.split.fused import fuse_projections

    up, gate, down, act = build_ffn(heavy, light, gated, **kw)
    for module in (up, gate, down):
        if module is not None:
            module.to(device=DEVICE, dtype=DTYPE)  # quantized parts keep float16 scales
    core = fuse_projections(up, gate, down, act, dtype=DTYPE)
    return core, (up, gate, down, act)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------ torch path (no Triton needed)


@torch.no_grad()
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("gated", [True, False])
def test_reference_path_equals_split_modules(bits, gated):
    """The fused core's torch path (dequantise, matmul) computes what the split modules compute."""
    from ffsplit.split.fused import fuse_projections

    up, gate, down, act = build_ffn((32, 16), [(96, bits)], gated, bias=not gated)
    core = fuse_projections(up, gate, down, act, backend="torch", dtype=torch.float32)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    want = down(act(gate(x)) * up(x)) if gated else down(act(up(x)))
    assert rel(core(x), want) < 1e-5
    assert core.plan.light == "quant" and core.plan.bits == bits
