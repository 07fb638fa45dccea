"""quantized_linear / quantized_conv2d / quantized_matmul against plain-torch references."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bitcompile.quant as Q
from bitcompile.numerics import reference as ref
from tests.strategies import tensors


def ternary_ref(w):
    """Dequantized BitNet absmean weight, per tensor (float64 for the reference)."""
    s = ref.weight_scale(w, "ternary", False)
    return ref.weight_integers(w, s, "ternary").double() * s.double()


def act_ref(x, bits=8):
    q, s = ref.quantize_activations(x, bits)
    return q.double() * s.double()


@given(st.data(), st.integers(1, 4), st.integers(1, 13), st.integers(1, 9), st.booleans(), st.booleans(), st.booleans())
def test_quantized_linear(data, m, k, n, qw, qa, bias):
    x = data.draw(tensors((m, k))).requires_grad_()
    w = data.draw(tensors((n, k))).requires_grad_()
    b = data.draw(tensors((n,))) if bias else None
    y = Q.quantized_linear(x, w, b, quantize_weights=qw, quantize_activations=qa)
    xr = act_ref(x.detach()) if qa else x.detach().double()
    wr = ternary_ref(w.detach()) if qw else w.detach().double()
    expected = xr @ wr.t() + (b.double() if bias else 0)
    # float32 accumulation of K <= 13 products of magnitude <~ 10: a few ulps of the result.
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    g = data.draw(tensors((m, n)))
    y.backward(g)
    # STE: both quantizers are the identity in the backward.
    torch.testing.assert_close(x.grad.double(), g.double() @ wr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), g.double().t() @ xr, rtol=1e-5, atol=1e-4)


@given(st.data(), st.integers(1, 12), st.integers(1, 6), st.booleans())
def test_quantized_linear_with_a_ternary_tensor(data, k, n, per_channel):
    x = data.draw(tensors((3, k)))
    t = Q.ternary_quantize(data.draw(tensors((n, k))), per_channel)
    torch.testing.assert_close(Q.quantized_linear(x, t), F.linear(x, t.dequantize()), rtol=1e-5, atol=1e-5)
    # Asymmetric scales are not in the packed format: the float path gives the same values.
    asym = Q.learned_quantize(data.draw(tensors((n, k))), torch.tensor(0.3), torch.tensor(-0.2), 1.5, 0.5)
    torch.testing.assert_close(Q.quantized_linear(x, asym), F.linear(x, asym.dequantize()), rtol=1e-6, atol=1e-6)


@given(
    st.data(),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([1, 2]),
    st.sampled_from([0, 1]),
    st.booleans(),
    st.booleans(),
)
def test_quantized_conv2d(data, cin, cout, stride, padding, qw, qa):
    x = data.draw(tensors((2, cin, 5, 5))).requires_grad_()
    w = data.draw(tensors((cout, cin, 3, 3))).requires_grad_()
    b = data.draw(tensors((cout,)))
    y = Q.quantized_conv2d(x, w, b, stride=stride, padding=padding, quantize_weights=qw, quantize_activations=qa)
    xr = act_ref(x.detach().movedim(1, -1)).movedim(-1, 1).float() if qa else x.detach()
    s = ref.weight_scale(w.detach(), "ternary", False)
    wr = ref.weight_integers(w.detach(), s, "ternary").float() * s if qw else w.detach()
    torch.testing.assert_close(y, F.conv2d(xr, wr, b, stride, padding), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    xx, ww = xr.clone().requires_grad_(), wr.clone().requires_grad_()
    F.conv2d(xx, ww, b, stride, padding).sum().backward()
    torch.testing.assert_close(x.grad, xx.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ww.grad, rtol=1e-5, atol=1e-5)


@given(st.data(), st.integers(1, 4), st.integers(1, 10), st.integers(1, 6), st.booleans(), st.booleans(), st.booleans())
def test_quantized_matmul(data, m, k, n, qa, qb, use_ste):
    a = data.draw(tensors((m, k))).requires_grad_()
    b = data.draw(tensors((k, n))).requires_grad_()
    y = Q.quantized_matmul(a, b, quantize_a=qa, quantize_b=qb, use_ste=use_ste)
    ar = act_ref(a.detach()) if qa else a.detach().double()
    br = ternary_ref(b.detach().t()).t() if qb else b.detach().double()
    torch.testing.assert_close(y.double(), ar @ br, rtol=1e-5, atol=1e-4)
    if not y.requires_grad:  # both operands quantized, no STE: nothing to differentiate
        assert qa and qb and not use_ste
        return
    y.sum().backward()
    g = torch.ones(m, n, dtype=torch.float64)
    # With the STE every operand gets the identity-through-quantizer gradient; without it,
    # a quantized operand gets its true gradient, 0.
    if use_ste or not qa:
        torch.testing.assert_close(a.grad.double(), g @ br.t(), rtol=1e-5, atol=1e-4)
    else:
        assert a.grad is None or not a.grad.any()
    if use_ste or not qb:
        torch.testing.assert_close(b.grad.double(), ar.t() @ g, rtol=1e-5, atol=1e-4)
    else:
        assert b.grad is None or not b.grad.any()


def test_bad_shapes_name_what_is_supported():
    with pytest.raises(ValueError, match=r"a \[..., k\] and b \[k, n\]"):
        Q.quantized_matmul(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        Q.quantized_conv2d(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3))
