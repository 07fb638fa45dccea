"""TernaryConv2d against a plain-torch reimplementation of its formula."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.nn import TernaryConv2d
from bitcompile.numerics import reference as ref


def reference_forward(layer, x):
    """Plain torch: trits by per-channel thresholds delta_c * mean|W_c|, values alpha_c * trit,
    STE for W, exact gradient for alpha, sigmoid surrogate for delta."""
    w = layer.weight
    m = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    t = layer.threshold.reshape(-1, 1, 1, 1) * m
    a = layer.alpha.reshape(-1, 1, 1, 1)
    wd = w.detach()
    trits = (wd > t.detach()).float() - (wd < -t.detach()).float()
    tau = layer.temperature * m
    surrogate = a.detach() * torch.sigmoid((wd - t) / tau) - a.detach() * torch.sigmoid((-t - wd) / tau)
    w_q = trits * a + (w - wd) + (surrogate - surrogate.detach())
    if layer.activation_bits is not None:
        xc = x.movedim(1, -1)
        q, s = ref.quantize_activations(xc, layer.activation_bits)
        x = (q.float() * s).movedim(-1, 1).detach() + (x - x.detach())
    return F.conv2d(x, w_q, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups), trits


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([1, 3]),
    st.sampled_from([1, 2]),
    st.sampled_from([0, 1]),
    st.sampled_from([None, 8, 4]),
    st.floats(0.2, 1.2),
    st.integers(0, 99),
)
def test_matches_reference_forward_and_gradients(cin, cout, k, stride, padding, bits, threshold, seed):
    torch.manual_seed(seed)
    layer = TernaryConv2d(cin, cout, k, stride=stride, padding=padding, threshold=threshold, activation_bits=bits)
    twin = TernaryConv2d(cin, cout, k, stride=stride, padding=padding, threshold=threshold, activation_bits=bits)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, cin, 5, 5)
    y = layer(x)
    y_ref, trits = reference_forward(twin, x)
    assert torch.equal(layer.quantize_weight().codes.float(), trits)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # Each gradient sums over the up to 2 x 7 x 7 = 98 output positions, in another order than the
    # reference's: a float32 sum of n unit-size terms moves by ~sqrt(n) x 2^-24 x sqrt(n) ~ 6e-6, and
    # cancellation leaves that beside a small result (seen: 1.6e-6 on a bias gradient of 0.006).
    for name in ("weight", "bias", "threshold", "alpha"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(twin, name).grad, rtol=1e-4, atol=2e-5)
    if trits.abs().sum() > 0:  # alpha scales the non-zero trits only
        assert layer.alpha.grad.abs().sum() > 0


def test_values_are_per_channel_ternary_and_report():
    torch.manual_seed(0)
    layer = TernaryConv2d(3, 4, 3, padding=1)
    w = layer.quantize_weight().dequantize()
    for c in range(4):
        assert set(w[c].unique().tolist()) <= {-layer.alpha[c].item(), 0.0, layer.alpha[c].item()}
    layer.train()
    for _ in range(3):
        layer(torch.randn(2, 3, 6, 6))
    r = layer.quantization_report()
    assert r["num_batches_tracked"] == 3 and r["running_input_absmax"] > 0
    assert abs(r["fraction_negative"] + r["fraction_zero"] + r["fraction_positive"] - 1) < 1e-9
    assert r["running_sparsity"] == r["channel_sparsity"]  # weights unchanged: the EMA of a constant
    layer.eval()
    layer(torch.randn(1, 3, 6, 6))
    assert layer.quantization_report()["num_batches_tracked"] == 3  # eval does not update statistics


def test_learned_thresholds_move_sparsity_under_training():
    torch.manual_seed(0)
    layer = TernaryConv2d(2, 3, 3, threshold=0.5)
    opt = torch.optim.SGD([layer.threshold], lr=0.5)
    before = layer.quantization_report()["fraction_zero"]
    for _ in range(20):  # pushing outputs to 0 rewards more zero weights: thresholds rise
        opt.zero_grad()
        layer(torch.randn(4, 2, 5, 5)).pow(2).mean().backward()
        opt.step()
    assert layer.quantization_report()["fraction_zero"] > before
