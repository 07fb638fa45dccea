import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.quant.packing import pack_ternary, packed_columns, unpack_ternary


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
