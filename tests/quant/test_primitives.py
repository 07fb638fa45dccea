"""Properties of the quantization methods, dequantization and TernaryTensor."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bitcompile.quant as Q
from bitcompile.numerics import reference as ref
from tests.strategies import tensors

shapes = st.tuples(st.integers(1, 9), st.integers(1, 13))
TRITS = {-1, 0, 1}


def trit_set(t):
    return set(t.codes.unique().tolist())


@given(st.data(), shapes, st.floats(0.05, 2.0), st.floats(0.25, 3.0))
def test_threshold_quantize_follows_its_rule(data, shape, threshold, scale):
    x = data.draw(tensors(shape))
    q = Q.threshold_quantize(x, threshold, scale)
    t = threshold * scale
    expected = torch.where(x > t, 1, torch.where(x < -t, -1, 0))
    assert torch.equal(q.codes.long(), expected)
    assert trit_set(q) <= TRITS
    assert torch.equal(Q.dequantize(q), expected.float())  # unit scale


@given(st.data(), shapes, st.floats(0.0, 1.0))
def test_target_sparsity_within_one_element(data, shape, sparsity):
    x = data.draw(tensors(shape))
    q = Q.adaptive_threshold_quantize(x, target_sparsity=sparsity)
    zeros = int((q.codes == 0).sum())
    assert abs(zeros - sparsity * x.numel()) <= 1
    # The zeroed elements are the smallest in magnitude.
    if 0 < zeros < x.numel():
        assert x[q.codes == 0].abs().max() <= x[q.codes != 0].abs().min()
    assert torch.equal(q.codes[q.codes != 0], torch.sign(x)[q.codes != 0].to(torch.int8))


@given(st.data(), shapes, st.floats(0.0, 1.0))
def test_percentile_threshold(data, shape, percentile):
    x = data.draw(tensors(shape))
    q = Q.adaptive_threshold_quantize(x, percentile=percentile)
    assert abs(int((q.codes == 0).sum()) - percentile * x.numel()) <= 1


@given(st.data(), shapes, st.floats(0.1, 3.0))
def test_stochastic_quantize(data, shape, temperature):
    x = data.draw(tensors(shape))
    a = Q.stochastic_quantize(x, temperature, training=False)
    b = Q.stochastic_quantize(x, temperature, training=False)
    assert torch.equal(a.codes, b.codes)  # deterministic without training
    assert torch.equal(a.codes, Q.threshold_quantize(x, 0.5).codes)  # the T -> 0 limit
    s = Q.stochastic_quantize(x, temperature, training=True, generator=torch.Generator().manual_seed(0))
    assert trit_set(s) <= TRITS


def test_stochastic_quantize_samples_the_documented_distribution():
    x = torch.full((20000,), 0.3)
    q = Q.stochastic_quantize(x, temperature=0.5, training=True, generator=torch.Generator().manual_seed(1))
    p_neg, p_zero, p_pos = (p[0].item() for p in Q.primitives.stochastic_probabilities(x, 0.5))
    freq = {v: (q.codes == v).float().mean().item() for v in (-1, 0, 1)}
    # 5 standard errors of a Bernoulli mean over 20000 samples is < 0.02.
    assert abs(freq[1] - p_pos) < 0.02 and abs(freq[-1] - p_neg) < 0.02 and abs(freq[0] - p_zero) < 0.02


@given(st.data(), shapes)
def test_learned_quantize_forward_and_gradients(data, shape):
    x = data.draw(tensors(shape, scale=1.0)).requires_grad_()
    pt = torch.tensor(0.4, requires_grad=True)
    nt = torch.tensor(-0.6, requires_grad=True)
    ps = torch.tensor(1.5, requires_grad=True)
    ns = torch.tensor(0.5, requires_grad=True)
    q = Q.learned_quantize(x, pt, nt, ps, ns)
    xd = x.detach()
    expected = torch.where(xd > 0.4, 1.5, torch.where(xd < -0.6, -0.5, 0.0))
    y = q.dequantize()
    assert torch.allclose(y, expected)
    # A loss that pulls every value towards 1 gives every parameter a gradient.
    (y - 1).pow(2).sum().backward()
    for p in (pt, nt):
        assert p.grad is not None and torch.isfinite(p.grad)
    assert torch.equal(x.grad, 2 * (y.detach() - 1))  # the STE: dL/dx = dL/dy
    assert ps.grad == pytest.approx(float((2 * (y.detach() - 1) * (q.codes > 0)).sum()), rel=1e-5)


def test_learned_thresholds_get_nonzero_gradients():
    x = torch.linspace(-1, 1, 101)
    pt = torch.tensor(0.3, requires_grad=True)
    nt = torch.tensor(-0.3, requires_grad=True)
    Q.learned_quantize(x, pt, nt).dequantize().sum().backward()
    # Raising the positive threshold removes +1s (sum falls): negative slope; the negative one the reverse.
    assert pt.grad < 0 and nt.grad < 0


@given(st.data(), shapes, st.booleans())
def test_xnor_quantize(data, shape, binary):
    x = data.draw(tensors(shape))
    q, alpha = Q.xnor_quantize(x, binary)
    assert alpha == pytest.approx(float(x.abs().mean().clamp(min=ref.EPS)), rel=1e-5)
    if binary:
        assert torch.equal(q.codes, torch.where(x >= 0, 1, -1).to(torch.int8))
    else:
        assert torch.equal(q.codes, (x / alpha).round().clamp(-1, 1).to(torch.int8))


@given(st.data(), shapes, st.booleans())
def test_ternary_quantize_matches_the_backend_quantizer(data, shape, per_channel):
    x = data.draw(tensors(shape))
    q = Q.ternary_quantize(x, per_channel)
    wq, scale = torch.ops.bitnet.quantize_weights(x, "ternary", per_channel)
    assert torch.equal(q.pack(), wq)
    assert torch.equal(q.scale.reshape(-1), scale)
    # dequantize(quantize(x)) is within half a step (s/2) of x where |x| <= 1.5 s, the clipping range.
    s = scale.reshape(-1, 1) if per_channel else scale
    err = (Q.dequantize(q) - x).abs()
    inside = x.abs() <= 1.5 * s
    assert bool((err[inside] <= (0.5 * s).expand_as(x)[inside] * (1 + 1e-6)).all())


@given(st.data(), shapes, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.floats(0.5, 4.0))
def test_dequantize_scale_and_dtype(data, shape, dtype, scale):
    x = data.draw(tensors(shape))
    q = Q.ternary_quantize(x)
    y = Q.dequantize(q, scale=scale, dtype=dtype)
    assert y.dtype == dtype
    assert torch.equal(y, (q.codes.float() * q.scale * scale).to(dtype))


@given(st.data(), shapes, st.booleans())
def test_affine_dequantize(data, shape, per_channel):
    x = data.draw(tensors(shape))
    q = Q.threshold_quantize(x)
    scale = torch.rand(shape[0]) + 0.5 if per_channel else torch.tensor([1.5])
    zero = torch.randn(shape[0]) if per_channel else torch.tensor([0.25])
    expected = q.codes.float() * (scale[:, None] if per_channel else scale) + (zero[:, None] if per_channel else zero)
    assert torch.equal(Q.affine_dequantize(q, scale, zero), expected)


def test_affine_dequantize_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="per-channel"):
        Q.affine_dequantize(Q.threshold_quantize(torch.randn(4, 3)), torch.ones(3))


@given(st.data(), st.tuples(st.integers(1, 5), st.integers(1, 17)))
def test_ternary_tensor_packs_round_trip(data, shape):
    q = Q.ternary_quantize(data.draw(tensors(shape)))
    packed = q.pack()
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (shape[1] + 3) // 4
    back = Q.TernaryTensor.from_packed(packed, shape[1], q.scale)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())


def test_ternary_tensor_interoperates_with_torch():
    x = torch.randn(4, 6)
    q = Q.ternary_quantize(x)
    a = torch.randn(3, 4)
    assert torch.equal(torch.matmul(a, q), a @ q.dequantize())
    assert torch.equal(a @ q, a @ q.dequantize())
    assert torch.equal(torch.relu(q), torch.relu(q.dequantize()))
    assert int((q == -1).sum()) == int((q.codes == -1).sum())
    with pytest.raises(ValueError, match="-1, 0, 1"):
        Q.TernaryTensor(torch.tensor([2, 0], dtype=torch.int8))
    with pytest.raises(TypeError, match="floating-point"):
        Q.ternary_quantize(torch.ones(3, dtype=torch.int32))


@given(st.data(), shapes)
def test_validation_report(data, shape):
    x = data.draw(tensors(shape))
    q = Q.ternary_quantize(x)
    r = Q.validate_quantization(x, q)
    err = x - q.dequantize()
    assert r.mse == pytest.approx(float((err**2).mean()), rel=1e-5, abs=1e-9)
    assert r.mae == pytest.approx(float(err.abs().mean()), rel=1e-5, abs=1e-9)
    assert r.fraction_negative + r.fraction_zero + r.fraction_positive == pytest.approx(1.0)
    assert r.fraction_zero == pytest.approx(float((q.codes == 0).float().mean()))
    assert "Distribution:" in str(r)
