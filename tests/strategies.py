"""Hypothesis strategies shared by the test modules."""

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def tensors(draw, shape, dtype=torch.float32, scale=3.0):
    """A random tensor from a drawn seed (fast: no element-wise drawing)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# K includes 1 and values that are not multiples of 4; leading dims from 0 to 3 of them.
ks = st.integers(1, 37)
ns = st.integers(1, 24)
batch_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
