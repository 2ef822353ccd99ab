"""The stored quantized format: group sizes, bit packing layout and round trips, field checks."""

from __future__ import annotations

import math

import pytest
import torch

from ffsplit.compress.quant import quantize_groups
from ffsplit.errors import FFSplitError
from ffsplit.split import qformat
from ffsplit.split.qformat import (
    QuantizedTensor,
    pack_bits,
    packed_size,
    pick_group_size,
    unpack_bits,
)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize(
    ("cols", "preferred", "expected"),
    [
        (576, 128, 64),
        (768, 128, 128),
        (1536, 128, 128),
        (48, 128, 16),
        (100, 128, 100),
        (8, 128, 8),
    ],
)
def test_pick_group_size(cols: int, preferred: int, expected: int) -> None:
    assert pick_group_size(cols, preferred) == expected


def test_pick_group_size_respects_preferred() -> None:
    assert pick_group_size(768, preferred=64) == 64
    with pytest.raises(FFSplitError, match="cols"):
        pick_group_size(0)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 1 << bits, (count,), generator=generator, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_layout_is_little_endian_bit_stream() -> None:
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 3 bits: codes 1, 2, 3 fill stream bits 0-2, 3-5, 6-8 (least significant bit first).
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [
        1 | 2 << 3 | 1 << 6 | 1 << 7,
        0,
    ]
    assert pack_bits(torch.tensor([1] * 8, dtype=torch.uint8), 1).tolist() == [255]


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_pack_unpack_across_chunks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qformat, "_PACK_CHUNK", 16)
    values = torch.randint(0, 1 << bits, (101,), generator=torch.Generator().manual_seed(bits))
    values = values.to(torch.uint8)
    packed = pack_bits(values, bits)
    monkeypatch.setattr(qformat, "_PACK_CHUNK", 1 << 20)
    assert torch.equal(packed, pack_bits(values, bits))
    monkeypatch.setattr(qformat, "_PACK_CHUNK", 24)
    assert torch.equal(unpack_bits(packed, bits, 101), values)


def test_pack_rejects_bad_codes() -> None:
    with pytest.raises(FFSplitError, match="fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(FFSplitError, match="uint8"):
        pack_bits(torch.tensor([1, 2]), 3)
    with pytest.raises(FFSplitError, match="bits"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(FFSplitError, match=r"uint8 \[2\]"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


def test_quantized_tensor_validates_its_fields() -> None:
    q = quantize_groups(gaussian(4, 32), 3, 16)
    with pytest.raises(FFSplitError, match="packed"):
        QuantizedTensor(q.packed[:-1], q.scales, q.zeros, 3, 16, (4, 32))
    with pytest.raises(FFSplitError, match="scales"):
        QuantizedTensor(q.packed, q.scales.float(), q.zeros, 3, 16, (4, 32))
    with pytest.raises(FFSplitError, match="group_size"):
        QuantizedTensor(q.packed, q.scales, q.zeros, 3, 12, (4, 32))
