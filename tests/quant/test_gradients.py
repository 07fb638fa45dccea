"""Gradient estimators and advanced techniques (``bitcompile.quant.gradients``)."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bitcompile.quant as Q
from tests.strategies import tensors

shapes = st.tuples(st.integers(1, 7), st.integers(1, 11))


def grad_of(fn, x, upstream):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


@given(st.data(), shapes)
def test_ste_forward_is_quantized_and_gradient_is_identity(data, shape):
    x = data.draw(tensors(shape))
    g = data.draw(tensors(shape))
    y, gx = grad_of(Q.ste_quantize, x, g)
    assert torch.equal(y, Q.ternary_quantize(x).dequantize())
    assert torch.equal(gx, g)


@given(st.data(), shapes, st.floats(0.1, 3.0))
def test_clipped_ste_zero_outside_threshold(data, shape, threshold):
    x = data.draw(tensors(shape))
    g = data.draw(tensors(shape))
    y, gx = grad_of(lambda t: Q.clipped_ste_quantize(t, threshold), x, g)
    assert torch.equal(y, Q.ternary_quantize(x).dequantize())
    inside = x.abs() <= threshold
    assert torch.equal(gx[inside], g[inside])
    assert bool((gx[~inside] == 0).all())


@given(st.data(), shapes)
def test_soft_quantization_approaches_hard_as_temperature_falls(data, shape):
    x = data.draw(tensors(shape))
    x = torch.where(x.abs() < 0.05, 0.05, x)  # keep away from 0 where sign is discontinuous
    errors = [(Q.soft_quantize(x, t) - torch.sign(x)).abs().max().item() for t in (1.0, 0.1, 0.01)]
    assert errors[0] >= errors[1] >= errors[2]
    # |tanh(x/T) - sign(x)| <= 2 exp(-2|x|/T): with |x| >= 0.05 and T = 0.01 that is < 1e-4.
    assert errors[2] <= 2 * math.exp(-2 * 0.05 / 0.01) + 1e-6


@given(st.data(), shapes, st.floats(0.05, 2.0))
def test_soft_hard_mode(data, shape, temperature):
    x = data.draw(tensors(shape))
    g = data.draw(tensors(shape))
    y, gx = grad_of(lambda t: Q.soft_quantize(t, temperature, hard=True), x, g)
    assert torch.equal(y, torch.sign(x))
    expected = g * (1 - torch.tanh(x / temperature) ** 2) / temperature
    assert torch.allclose(gx, expected, rtol=1e-5, atol=1e-6)


@given(st.data(), shapes, st.floats(0.1, 5.0))
def test_gumbel_hard_outputs_are_trits_with_soft_gradient(data, shape, temperature):
    x = data.draw(tensors(shape, scale=1.0))
    seed = data.draw(st.integers(0, 1000))
    hard, gx = grad_of(
        lambda t: Q.gumbel_softmax_quantize(t, temperature, hard=True, generator=torch.Generator().manual_seed(seed)),
        x,
        torch.ones(shape),
    )
    assert set(hard.unique().tolist()) <= {-1.0, 0.0, 1.0}
    soft, gs = grad_of(
        lambda t: Q.gumbel_softmax_quantize(t, temperature, hard=False, generator=torch.Generator().manual_seed(seed)),
        x,
        torch.ones(shape),
    )
    assert bool((soft.abs() <= 1).all())
    assert torch.allclose(gx, gs)  # hard mode: soft gradient
    # The hard sample is the argmax of the same noisy probabilities: its sign agrees with a clear soft value.
    clear = soft.abs() > 0.5
    assert torch.equal(torch.sign(soft[clear]), hard[clear])


@given(st.data(), shapes, st.integers(0, 15))
def test_progressive_quantize_blends(data, shape, epoch):
    x = data.draw(tensors(shape))
    g = data.draw(tensors(shape))
    y, gx = grad_of(lambda t: Q.progressive_quantize(t, epoch, warmup_epochs=10), x, g)
    a = min(epoch / 10, 1.0)
    assert torch.allclose(y, (1 - a) * x + a * Q.ste_quantize(x), atol=1e-6)
    assert torch.allclose(gx, g)  # both branches have identity gradient


@given(st.data(), shapes, st.floats(0.0, 1.0))
def test_differentiable_sparse_quantize(data, shape, sparsity):
    x = data.draw(tensors(shape))
    t = Q.threshold_for_sparsity(x, sparsity)
    assert abs(int((x.abs() <= t).sum()) - sparsity * x.numel()) <= 1 or sparsity * x.numel() < 0.5
    y, gx = grad_of(lambda v: Q.differentiable_sparse_quantize(v, sparsity, temperature=0.01), x, torch.ones(shape))
    assert bool((y.abs() <= 1).all()) and bool(torch.isfinite(gx).all())
    # At a low temperature values well outside the threshold go to their sign, well inside to 0.
    far = (x.abs() - t).abs() > 0.1
    expected = torch.where(x.abs() > t, torch.sign(x), torch.zeros_like(x))
    assert torch.allclose(y[far], expected[far], atol=1e-3)


@given(st.data(), st.integers(1, 3), st.integers(1, 4), st.booleans())
def test_quantized_batch_norm_matches_reference(data, batch, channels, training):
    x = data.draw(tensors((batch, channels, 3, 3)))
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels)
    rm, rv = torch.zeros(channels), torch.ones(channels)
    rm2, rv2 = rm.clone(), rv.clone()
    y = Q.quantized_batch_norm(x, gamma, beta, rm, rv, training=training)
    n = F.batch_norm(x, rm2, rv2, gamma, beta, training, 0.1, 1e-5)
    assert torch.equal(y, Q.ternary_quantize(n).dequantize())
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)  # running stats updated alike


def test_quantized_batch_norm_module():
    bn = Q.QuantizedBatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = bn(x)
    assert len(y.unique()) <= 3
    y.sum().backward()
    assert bn.weight.grad is not None and x.grad is not None
    assert not torch.equal(bn.running_mean, torch.zeros(3))
