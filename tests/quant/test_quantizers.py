"""The weight-quantizer protocol, the example quantizers and the custom schemes (eager)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bitcompile.quant as Q
from tests.strategies import tensors

shapes = st.tuples(st.integers(2, 8), st.integers(2, 16))

ALL = [
    lambda w: Q.TernaryQuantizer(),
    lambda w: Q.PercentileQuantizer(0.6),
    lambda w: Q.LayerAdaptiveQuantizer(2, scale=w.abs().mean().item()),
    lambda w: Q.MixedPrecisionQuantizer(["binary", "ternary"]),
    lambda w: Q.LogQuantizer(4),
    lambda w: Q.LSQQuantizer.from_tensor(w, 4),
    lambda w: Q.SoftQuantizer(0.5, scale=w.abs().mean().item()),
    lambda w: Q.BlockwiseMixedPrecisionQuantizer(4),
    lambda w: Q.OutlierAwareQuantizer(0.05),
]


@pytest.mark.parametrize("make", ALL)
def test_every_quantizer_implements_the_protocol(make):
    w = torch.randn(6, 10)
    q = make(w)
    assert isinstance(q, Q.WeightQuantizer)
    Q.check_quantizer(q)
    qt = q.quantize(w)
    assert isinstance(qt, Q.QuantizedTensor) and qt.codes.dtype == torch.int8 and qt.shape == w.shape
    y = Q.fake_quantize(q, w)
    assert y.shape == w.shape and y.dtype == w.dtype
    # Under no_grad there is no gradient carrier, and the value is the same.
    with torch.no_grad():
        plain = q.quantize(w)
    assert plain.grad_carrier is None
    assert torch.allclose(q.dequantize(plain), q.dequantize(qt), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", ALL)
def test_fake_quantized_gradient_reaches_input_and_learned_parameters(make):
    w = torch.randn(6, 10, requires_grad=True)
    q = make(w)
    target = torch.randn(6, 10)
    (Q.fake_quantize(q, w) - target).pow(2).sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all()) and w.grad.abs().sum() > 0
    for p in q.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, type(q).__name__


def test_check_quantizer_names_what_is_missing():
    class Half:
        def quantize(self, x):
            return x

    with pytest.raises(TypeError, match="dequantize, parameters"):
        Q.check_quantizer(Half())


@given(st.data(), shapes, st.floats(0.1, 0.9))
def test_percentile_quantizer_sparsity(data, shape, p):
    x = data.draw(tensors(shape))
    q = Q.PercentileQuantizer(p).quantize(x)
    assert abs(int((q.codes == 0).sum()) - p * x.numel()) <= 1
    kept = q.codes != 0
    assert q.scale.item() == pytest.approx(float(x.abs()[kept].mean()), rel=1e-5)


def test_layer_adaptive_quantizer_per_layer_and_by_name():
    q = Q.LayerAdaptiveQuantizer(layers=["a", "b"], threshold=0.5, scale=[1.0, 2.0])
    x = torch.tensor([-3.0, -1.5, -0.4, 0.0, 0.7, 1.2, 2.5])
    assert torch.equal(q.quantize(x, "a").dequantize(), torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert torch.equal(q.quantize(x, 1).dequantize(), torch.tensor([-2.0, -2.0, 0.0, 0.0, 0.0, 2.0, 2.0]))
    with pytest.raises(KeyError, match="known layers"):
        q.quantize(x, "c")


def test_mixed_precision_quantizer_modes():
    q = Q.MixedPrecisionQuantizer(["binary", "ternary"])
    x = torch.randn(5, 7)
    assert set(q.quantize(x, 0).codes.unique().tolist()) <= {-1, 1}
    assert torch.equal(q.quantize(x, 1).dequantize(), Q.ternary_quantize(x).dequantize())
    with pytest.raises(ValueError, match="supported: binary, ternary"):
        Q.MixedPrecisionQuantizer(["octal"])


@given(st.data(), shapes, st.integers(2, 6))
def test_log_quantizer_levels_and_error(data, shape, bits):
    x = data.draw(tensors(shape))
    q = Q.LogQuantizer(bits)
    y = q.dequantize(q.quantize(x))
    m = x.abs().max()
    levels = q.levels
    allowed = torch.cat([torch.zeros(1), m * torch.exp2(-torch.arange(levels, dtype=torch.float32))])
    assert bool(torch.isclose(y.abs().unsqueeze(-1), allowed).any(-1).all())
    # Rounding in log2: inside the range, |y| / |x| lies within 2^(+-1/2).
    inside = x.abs() >= m * 2.0 ** (-(levels - 1))
    ratio = y[inside].abs() / x[inside].abs()
    assert bool((ratio <= math.sqrt(2) * (1 + 1e-5)).all() and (ratio >= 1 / math.sqrt(2) * (1 - 1e-5)).all())


@given(st.data(), shapes, st.integers(2, 8), st.booleans())
def test_lsq_forward_and_gradient_scaling(data, shape, bits, per_channel):
    x = data.draw(tensors(shape)).requires_grad_()
    q = Q.LSQQuantizer.from_tensor(x, bits, per_channel)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = q.step.detach()
    v = (x.detach() / s).clamp(-qn, qp)
    y = Q.fake_quantize(q, x)
    assert torch.allclose(y, v.round() * s, rtol=1e-6, atol=1e-7)
    # |error| <= s/2 inside the range (the dequantize-quantize bound).
    inside = (x.detach() / s > -qn) & (x.detach() / s < qp)
    assert bool(((y - x).abs()[inside] <= (0.5 * s.expand_as(x))[inside] * (1 + 1e-5) + 1e-7).all())
    g = torch.randn(shape)
    y.backward(g)
    # LSQ: dy/ds = round(v) - v inside, -Qn / Qp outside; scaled by 1/sqrt(numel * Qp).
    dyds = torch.where(inside, v.round() - v, v.round())
    expected = (g * dyds) / math.sqrt(x.numel() * qp)
    expected = expected.sum(dim=1, keepdim=True) if per_channel else expected.sum()
    assert torch.allclose(q.step.grad, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(x.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-6, atol=0)  # (x / s) * s: 1 ulp


def test_soft_quantizer_hard_and_soft_modes():
    x = torch.randn(4, 9)
    hard = Q.SoftQuantizer(0.5, scale=1.0, hard=True)
    assert set(Q.fake_quantize(hard, x).unique().tolist()) <= {-1.0, 0.0, 1.0}
    soft = Q.SoftQuantizer(0.5, scale=1.0, hard=False)
    assert torch.allclose(Q.fake_quantize(soft, x), torch.tanh(x / 0.5))


@given(st.data(), shapes, st.sampled_from([1, 3, 4]), st.floats(0.0, 1.0))
def test_blockwise_mixed_precision(data, shape, block, fraction):
    x = data.draw(tensors(shape))
    q = Q.BlockwiseMixedPrecisionQuantizer(block, low_bits=2, high_bits=8, high_precision_fraction=fraction)
    qt = q.quantize(x)
    n_blocks = shape[0] * math.ceil(shape[1] / block)
    assert abs(int((q.last_bits == 8).sum()) - fraction * n_blocks) <= 0.5 + 1e-9
    high = (q.last_bits == 8).repeat_interleave(block, dim=-1)[..., : shape[1]]
    assert set(qt.codes[~high].unique().tolist()) <= {-1, 0, 1}
    # 8-bit blocks: error within half a step (absmax / 127 / 2).
    err = (qt.dequantize() - x).abs()
    assert bool((err[high] <= qt.scale[high] * 0.5 * (1 + 1e-5)).all())


@given(st.data(), shapes, st.floats(0.0, 0.3))
def test_outlier_aware_keeps_outliers_exactly(data, shape, fraction):
    x = data.draw(tensors(shape))
    q = Q.OutlierAwareQuantizer(fraction)
    qt = q.quantize(x)
    y = q.dequantize(qt)
    n_out = int(qt.outlier_mask.sum())
    assert abs(n_out - fraction * x.numel()) <= 1
    assert torch.equal(y[qt.outlier_mask], x[qt.outlier_mask])
    if n_out:
        assert x.abs()[qt.outlier_mask].min() >= x.abs()[~qt.outlier_mask].max() if n_out < x.numel() else True
    inl = ~qt.outlier_mask
    assert torch.equal(y[inl], (qt.codes[inl].float() * qt.scale))
    assert qt.scale.item() == pytest.approx(float(x.abs()[inl].mean().clamp(min=1e-8)), rel=1e-5)


def test_former_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="WeightQuantizer"):
        assert Q.Quantizer is Q.WeightQuantizer
    import importlib
    import sys

    sys.modules.pop("bitcompile.quant.packing", None)
    with pytest.warns(DeprecationWarning, match="numerics.packing"):
        packing = importlib.import_module("bitcompile.quant.packing")
    assert packing.pack_ternary is Q.pack_ternary
