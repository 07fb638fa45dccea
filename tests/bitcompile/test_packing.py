import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics.packing import (
    KBLOCK_ORDERS,
    ZERO_PAIRS,
    from_kblocked,
    kblocked_columns,
    pack_ternary,
    packed_columns,
    to_kblocked,
    unpack_ternary,
)


@given(rows=st.lists(st.integers(1, 5), max_size=2).map(tuple), k=st.integers(1, 41), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(rows, k, seed):
    trits = torch.randint(-1, 2, (*rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_ternary(trits)
    assert packed.dtype == torch.uint8 and packed.shape == (*rows, packed_columns(k))
    assert torch.equal(unpack_ternary(packed, k), trits)


def test_layout_matches_design():
    # trit j of a byte in bits 2j..2j+1, code = trit + 1, K padded with zero trits (code 1).
    trits = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    packed = pack_ternary(trits)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 0 | 1 << 2 | 1 << 4 | 1 << 6]]


def test_invalid_code_and_shape_are_errors():
    with pytest.raises(ValueError, match="invalid code 3"):
        unpack_ternary(torch.tensor([[0xFF]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="packed columns"):
        unpack_ternary(torch.zeros(1, 2, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_ternary(torch.zeros(1, 1, dtype=torch.int8), 3)


@pytest.mark.parametrize("order", KBLOCK_ORDERS)
@given(k=st.integers(1, 600), seed=st.integers(0, 2**31 - 1))
def test_kblocked_roundtrip(order, k, seed):
    trits = torch.randint(-1, 2, (3, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    blocked = to_kblocked(pack_ternary(trits), k, order)
    assert blocked.shape == (3, kblocked_columns(k)) and blocked.dtype == torch.uint8
    assert torch.equal(unpack_ternary(from_kblocked(blocked, k, order), k), trits)


def test_kblocked_layouts_match_their_description():
    # Trit 64g + 4w + n of a block is in word w (little-endian); "nibbles": quarters 2h and 2h + 1
    # at n are one pair code d(even) + 3 d(odd) (d: +1 -> 0, -1 -> 1, 0 -> 2) at bit 16h + 4n;
    # "fields": trit + 1 at bit 8n + 2g.
    trits = torch.zeros(1, 256, dtype=torch.int8)
    trits[0, 64 * 2 + 4 * 1 + 3] = 1  # g=2, w=1, n=3
    trits[0, 64 * 1 + 4 * 0 + 1] = -1  # g=1, w=0, n=1
    words = to_kblocked(pack_ternary(trits), 256).view(torch.int32)[0]
    assert words[1].item() & 0xFFFFFFFF == 0x68888888  # (+1, 0): 0 + 3 * 2 at bit 28
    assert words[0].item() & 0xFFFFFFFF == 0x88888858  # (0, -1): 2 + 3 * 1 at bit 4
    assert (words[2:] & 0xFFFFFFFF == ZERO_PAIRS).all()  # zero trits everywhere else
    fields = to_kblocked(pack_ternary(trits), 256, "fields").view(torch.int32)[0]
    assert fields[1].item() & 0xFFFFFFFF == 0x55555555 + (1 << 28)  # trit + 1 = 2 at bit 8*3 + 2*2
    assert fields[0].item() & 0xFFFFFFFF == 0x55555555 - (1 << 10)  # trit + 1 = 0 at bit 8*1 + 2*1


def test_kblocked_invalid_code_and_order_are_errors():
    with pytest.raises(ValueError, match="invalid pair code"):
        from_kblocked(torch.full((1, 64), 0xAA, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="supported: nibbles, fields"):
        to_kblocked(torch.zeros(1, 1, dtype=torch.uint8), 4, "bytes")
