"""The bitnet ops: opcheck (schema, fake, autograd registration) and the STE gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bitcompile.ops  # noqa: F401
from bitcompile.numerics import reference as ref
from tests.strategies import FLOAT_DTYPES, batch_shapes, ks, ns, tensors

bitnet = torch.ops.bitnet


def _operands(x, w, scheme="ternary", per_channel=False, bits=8):
    xq, xs = bitnet.quantize_activations(x, bits) if bits else (None, None)
    wq, ws = bitnet.quantize_weights(w, scheme, per_channel)
    return xq, xs, wq, ws


@pytest.mark.parametrize(
    "scheme,per_channel,bits", [("ternary", False, 8), ("ternary", True, 4), ("binary", False, 8), ("int8", True, None)]
)
def test_opcheck_every_op(scheme, per_channel, bits):
    x, w, b = torch.randn(2, 3, 10), torch.randn(6, 10), torch.randn(6)
    xq, xs, wq, ws = _operands(x, w, scheme, per_channel, bits)
    torch.library.opcheck(bitnet.quantize_activations, (x, 8))
    torch.library.opcheck(bitnet.quantize_weights, (w, scheme, per_channel))
    a = xq if bits else x
    torch.library.opcheck(bitnet.lowbit_matmul, (a, wq, 10))
    acc = bitnet.lowbit_matmul(a, wq, 10)
    torch.library.opcheck(bitnet.dequantize, (acc, xs, ws, b, torch.bfloat16))
    torch.library.opcheck(bitnet.grad_input, (torch.randn(2, 3, 6), wq, ws, 10))
    torch.library.opcheck(bitnet.grad_input, (torch.randn(2, 3, 6), wq, ws, 10, 8))
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), xq, xs, wq, ws)
    torch.library.opcheck(bitnet.lowbit_linear, args)
    torch.library.opcheck(bitnet.lowbit_linear, (*args, 8))


def test_opcheck_inference_linears():
    """``linear_q`` and its form on K-blocked weights (the opaque call of graphs under CUDA
    graphs): schema, fake, and the same result."""
    from bitcompile.numerics.packing import to_kblocked

    x, w, b, r = torch.randn(2, 3, 300), torch.randn(6, 300), torch.randn(6), torch.randn(2, 3, 6)
    xq, xs, wq, ws = _operands(x, w)
    args = (xq, xs, wq, ws, b, 300, torch.bfloat16, "silu", r)
    blocked = (xq, xs, to_kblocked(wq, 300), *args[3:])
    torch.library.opcheck(bitnet.linear_q, args)
    torch.library.opcheck(bitnet.linear_q_kblocked, blocked)
    assert torch.equal(bitnet.linear_q_kblocked(*blocked), bitnet.linear_q(*args))


def test_opcheck_grad_input_ws():
    """The Gluon input gradient's opaque op (CUDA only; the reference on the CPU): schema and
    fake (its shape without the batch dimensions, as the traced call passes 2-D grads)."""
    wq, ws = bitnet.quantize_weights(torch.randn(16, 10), "ternary", False)
    torch.library.opcheck(
        bitnet.grad_input_ws, (torch.randn(5, 16, dtype=torch.bfloat16), wq, ws, 10, [256, 128, 4, 3, 16])
    )


@given(
    data=st.data(),
    batch=batch_shapes,
    n=ns,
    k=ks,
    scheme=st.sampled_from(["ternary", "binary", "int8"]),
    per_channel=st.booleans(),
    bits=st.sampled_from([8, 4, None]),
    bias=st.booleans(),
)
def test_ste_gradients_match_design_formulas(data, batch, n, k, scheme, per_channel, bits, bias):
    x = data.draw(tensors((*batch, k))).requires_grad_()
    w = data.draw(tensors((n, k))).requires_grad_()
    b = data.draw(tensors((n,))).requires_grad_() if bias else None
    g = data.draw(tensors((*batch, n)))
    xq, xs, wq, ws = _operands(x.detach(), w.detach(), scheme, per_channel, bits)
    y = bitnet.lowbit_linear(x, w, b, xq, xs, wq, ws)
    y.backward(g)
    # The STE gradients: dL/dx = g @ (W_int * s_w), dL/dW = g^T @ (q * s_x), dL/db = sum g.
    w_deq = ref.unpack_weights(wq, k).float() * (ws[:, None] if per_channel or scheme == "int8" else ws)
    x_deq = xq.float() * xs if bits else x.detach()
    torch.testing.assert_close(x.grad, g @ w_deq)
    torch.testing.assert_close(w.grad, g.reshape(-1, n).t() @ x_deq.reshape(-1, k))
    if bias:
        torch.testing.assert_close(b.grad, g.reshape(-1, n).sum(0))
    # The forward is the quantized product itself.
    torch.testing.assert_close(y.detach(), x_deq @ w_deq.t() + (b.detach() if bias else 0), rtol=1e-5, atol=1e-5)


@given(data=st.data(), batch=batch_shapes, n=ns, k=ks, per_channel=st.booleans(), bits=st.sampled_from([8, 4]))
def test_grad_input_bits_changes_only_the_input_gradient(data, batch, n, k, per_channel, bits):
    x = data.draw(tensors((*batch, k)))
    w = data.draw(tensors((n, k)))
    g = data.draw(tensors((*batch, n)))
    operands = _operands(x, w, "ternary", per_channel)
    grads = []
    for grad_bits in (None, bits):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = bitnet.lowbit_linear(xi, wi, None, *operands, grad_bits)
        y.backward(g)
        grads.append((y.detach(), xi.grad, wi.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = grads
    assert torch.equal(y0, y1) and torch.equal(gw0, gw1)
    _, _, wq, ws = operands
    assert torch.equal(gx1, ref.grad_input_quantized(g, wq, ws, k, bits))


def test_grad_input_bits_are_validated():
    wq, ws = bitnet.quantize_weights(torch.randn(4, 8), "ternary", False)
    with pytest.raises(ValueError, match="grad_input_bits must be an int in 2..8"):
        bitnet.grad_input(torch.randn(2, 4), wq, ws, 8, 16)


@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_output_and_grad_dtypes_follow_inputs(data, dtype):
    x = data.draw(tensors((3, 8), dtype)).requires_grad_()
    w = data.draw(tensors((5, 8), dtype)).requires_grad_()
    y = bitnet.lowbit_linear(x, w, None, *_operands(x.detach(), w.detach()))
    y.sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype


def test_quantizer_outputs_are_not_differentiable():
    x = torch.randn(2, 4, requires_grad=True)
    q, s = bitnet.quantize_activations(x, 8)
    assert not q.requires_grad and not s.requires_grad


def test_quantize_weights_kblocked_is_both_layouts_of_quantize_weights():
    # The QAT quantizer of lowered linears: quantize_weights' codes and scale, plus those codes
    # K-blocked; int8 weights have no 2-bit layout and are refused with the supported schemes.
    from bitcompile.numerics.packing import to_kblocked

    w = torch.randn(24, 300)
    for scheme in ("ternary", "binary"):
        wq, scale, blocked = torch.ops.bitnet.quantize_weights_kblocked(w, scheme, False)
        want_q, want_s = torch.ops.bitnet.quantize_weights(w, scheme, False)
        assert torch.equal(wq, want_q) and torch.equal(scale, want_s)
        assert torch.equal(blocked, to_kblocked(want_q, 300))
    with pytest.raises(ValueError, match="ternary, binary"):
        torch.ops.bitnet.quantize_weights_kblocked(w, "int8", False)
