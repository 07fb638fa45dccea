"""W8A16Linear against its formula in plain torch."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bitcompile.nn import W8A16Linear
from tests.strategies import tensors


def formula_reference(x, w, b):
    """scales = max|W| / 127, int8 = round(W / scales) (float32 scales, as stored: a float64
    quotient could round a code at .5 the other way), y = (x @ int8^T) * scales + b in float64."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=-1) / 127).clamp(min=1e-5)
    int8 = (w32 / scales[:, None]).round().clamp(-127, 127).double()
    y = x.double() @ int8.t() * scales.double()
    return (y + b.double() if b is not None else y), int8.to(torch.int8), scales


@given(
    st.data(), st.integers(1, 20), st.integers(1, 12), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16])
)
def test_w8a16_matches_its_formula(data, k, n, bias, dtype):
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    layer = W8A16Linear.from_linear(linear)
    assert layer.int8_weights.dtype == torch.int8 and layer.scales.shape == (n,)
    x = data.draw(tensors((3, k), dtype=dtype, scale=1.0))
    y_ref, int8, scales = formula_reference(
        x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
    )
    assert torch.equal(layer.int8_weights, int8)  # integers exactly
    y = layer(x)
    assert y.dtype == dtype
    # float32 accumulation of exact integer products; bf16 output rounding (2^-8 relative) dominates for bf16.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), **tol)


def test_w8a16_quantize_checks_shape_and_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = W8A16Linear(64, 32)
    layer.quantize(linear.weight)
    layer.bias = linear.bias.detach().clone()
    x = torch.randn(5, 64)
    # int8 absmax: each weight within half a step (max|row| / 254) of the original.
    assert (layer(x) - linear(x)).abs().max() < 0.05
    try:
        layer.quantize(torch.randn(3, 3))
    except ValueError as err:
        assert "[32, 64]" in str(err)
    else:
        raise AssertionError("bad shape accepted")
