"""The quantizers against the formulas of ``bitcompile.numerics.spec``, written out independently here."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.strategies import FLOAT_DTYPES, batch_shapes, ks, ns, tensors


@given(data=st.data(), batch=batch_shapes, k=ks, dtype=st.sampled_from(FLOAT_DTYPES), bits=st.integers(2, 8))
def test_activation_quantizer_formula(data, batch, k, dtype, bits):
    x = data.draw(tensors((*batch, k), dtype))
    q, s = ref.quantize_activations(x, bits)
    qmax = 2 ** (bits - 1) - 1
    expect_s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-5) / qmax
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (*batch, 1)
    torch.testing.assert_close(s, expect_s, rtol=0, atol=0)
    assert torch.equal(q.float(), (x.float() / expect_s).round().clamp(-qmax - 1, qmax))
    # Dequantization error is at most half a step per element.
    assert bool(((q.float() * s - x.float()).abs() <= s / 2 * (1 + 1e-5)).all())


@given(data=st.data(), n=ns, k=ks, dtype=st.sampled_from(FLOAT_DTYPES), per_channel=st.booleans())
def test_ternary_weight_quantizer_formula(data, n, k, dtype, per_channel):
    w = data.draw(tensors((n, k), dtype))
    wq, s = ref.quantize_weights(w, "ternary", per_channel)
    absw = w.float().abs()
    expect_s = (absw.mean(-1, keepdim=True) if per_channel else absw.mean()).clamp(min=1e-5)
    trits = (w.float() / expect_s).round().clamp(-1, 1)
    torch.testing.assert_close(s, expect_s.reshape(-1), rtol=0, atol=0)
    assert torch.equal(ref.unpack_weights(wq, k).float(), trits)


@given(data=st.data(), n=ns, k=ks)
def test_binary_and_int8_weight_quantizers(data, n, k):
    w = data.draw(tensors((n, k)))
    bq, bs = ref.quantize_weights(w, "binary", False)
    assert torch.equal(ref.unpack_weights(bq, k).float(), torch.where(w >= 0, 1.0, -1.0))
    torch.testing.assert_close(bs, w.abs().mean().reshape(1), rtol=0, atol=0)
    iq, is_ = ref.quantize_weights(w, "int8", True)
    expect = (w.abs().amax(-1) / 127).clamp(min=1e-5)  # the scale is clamped, as for ternary
    torch.testing.assert_close(is_, expect, rtol=0, atol=0)
    assert torch.equal(iq.float(), (w / expect[:, None]).round().clamp(-127, 127))


@given(data=st.data(), batch=batch_shapes, n=ns, k=st.integers(1, 300))
def test_lowbit_matmul_is_exact_int32(data, batch, n, k):
    x = data.draw(tensors((*batch, k)))
    w = data.draw(tensors((n, k)))
    q, _ = ref.quantize_activations(x)
    wq, _ = ref.quantize_weights(w)
    acc = ref.lowbit_matmul(q, wq, k)
    exact = q.long() @ ref.unpack_weights(wq, k).long().t()  # int64, no float involved
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact)


@given(
    data=st.data(),
    batch=batch_shapes,
    n=ns,
    k=ks,
    scheme=st.sampled_from(["ternary", "binary", "int8"]),
    per_channel=st.booleans(),
    bits=st.integers(2, 8),
    magnitude=st.sampled_from([1.0, 1e-9]),
)
def test_quantized_grad_input_within_half_a_step_of_exact(data, batch, n, k, scheme, per_channel, bits, magnitude):
    g = data.draw(tensors((*batch, n))) * magnitude  # 1e-9: far below the activations' clamp
    wq, ws = ref.quantize_weights(data.draw(tensors((n, k))), scheme, per_channel)
    got = ref.grad_input(g, wq, ws, k, bits)
    w_int = ref.unpack_weights(wq, k, torch.float64)
    exact = g.double() @ (w_int * ws.double().reshape(-1, 1))
    # Each element of g' = g * s_w (per-channel; per-tensor s_w multiplies at the end) is
    # rounded to a multiple of s_g = max|g'| / qmax of its row: off by <= s_g / 2. Plus fp32
    # rounding of the scales and the epilogue (relative 2**-20 of the magnitudes involved).
    gp = g.double() * (ws.double() if per_channel else 1.0)
    s_g = gp.abs().amax(-1, keepdim=True) / ref.qmax(bits)
    bound = s_g / 2 * w_int.abs().sum(0) + (gp.abs() @ w_int.abs()) * 2**-20
    bound = bound * (1.0 if per_channel else ws.double())
    assert got.shape == (*batch, k) and got.dtype == g.dtype
    assert ((got.double() - exact).abs() <= bound + 1e-300).all()


@given(data=st.data(), batch=batch_shapes, k=ks, dtype=st.sampled_from(FLOAT_DTYPES), learned=st.booleans())
def test_dequantized_activations_round_the_fp32_product_once(data, batch, k, dtype, learned):
    q, s = ref.quantize_activations(data.draw(tensors((*batch, k))))
    s = s.clone().requires_grad_(learned)
    got = ref.dequantized_activations(q, s, dtype)
    assert got.dtype == dtype and torch.equal(got, (q.float() * s.detach()).to(dtype))
    assert got.requires_grad == learned


def test_large_k_switches_to_float64_and_stays_exact():
    k = 1100  # 128*127*k > 2**24: float32 could round
    q = torch.full((2, k), -128, dtype=torch.int8)
    wq, _ = ref.quantize_weights(-torch.ones(3, k))
    assert torch.equal(ref.lowbit_matmul(q, wq, k), torch.full((2, 3), 128 * k, dtype=torch.int32))


def test_zero_nan_inf_inputs_have_defined_results():
    q, s = ref.quantize_activations(torch.zeros(2, 5))
    assert torch.equal(q, torch.zeros(2, 5, dtype=torch.int8)) and bool((s == 1e-5 / 127).all())
    wq, ws = ref.quantize_weights(torch.zeros(3, 5))
    assert bool((ws == 1e-5).all()) and not ref.unpack_weights(wq, 5).any()
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    q, s = ref.quantize_activations(x)
    y = ref.lowbit_linear(x, None, q, s, *ref.quantize_weights(torch.randn(4, 5)), 5)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all()
    wnan = torch.randn(4, 5)
    wnan[0, 0] = float("nan")
    y = ref.lowbit_linear(torch.randn(2, 5), None, None, None, *ref.quantize_weights(wnan), 5)
    assert torch.isnan(y).all()  # a NaN weight poisons the per-tensor scale: every output is NaN


@given(
    kind=st.sampled_from(["none", "rms", "rms_fp32", "layer"]),
    k=st.integers(1, 40),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_normalize_backward_matches_autograd(kind, k, affine, seed):
    # The hand-written norm backward (QAT through norm_quant) against autograd through the
    # forward formula, in float64 so the comparison is not about rounding.
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 2, k, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(k, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine and kind != "none" else None
    b = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_() if affine and kind == "layer" else None
    gy = torch.randn(3, 2, k, generator=g, dtype=torch.float64)

    def forward(h, w, b):  # ref.normalize computes in float32; the same formula in float64
        hf = h - h.mean(-1, keepdim=True) if kind == "layer" else h
        y = hf if kind == "none" else hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return y * (w if w is not None else 1) + (b if b is not None else 0)

    inputs = [t for t in (h, w, b) if t is not None]
    want = torch.autograd.grad(forward(h, w, b), inputs, gy)
    gh, gw, gb = ref.normalize_backward(h.detach(), gy, kind, w, b, 1e-5)
    got = [gh] + [t for t in (gw, gb) if t is not None]
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)  # float32 arithmetic inside
