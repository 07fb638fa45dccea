"""Conv pass and ops: exact integer conv vs an independent im2col + lowbit_matmul, STE
gradients vs float conv on the dequantized operands, compiled == BitConv reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bitcompile
import bitcompile.ops  # noqa: F401
from bitcompile.nn.bit_conv import BitConv1d, BitConv2d
from bitcompile.nn.reference_model import reference_model
from bitcompile.numerics import reference as ref
from tests.helpers import EXACT


def im2col_accumulate(xq, ints, stride, padding, dilation):
    """Independent oracle: unfold the int8 input and use the linear path's exact matmul."""
    n, cout = xq.shape[0], ints.shape[0]
    cols = F.unfold(xq.double(), ints.shape[2:], dilation=dilation, padding=padding, stride=stride)  # [N, K, L]
    k = cols.shape[1]
    packed = bitcompile.numerics.packing.pack_ternary(ints.reshape(cout, k))
    acc = ref.lowbit_matmul(cols.transpose(1, 2).to(torch.int8), packed, k)  # [N, L, Cout]
    hout = (xq.shape[2] + 2 * padding[0] - dilation[0] * (ints.shape[2] - 1) - 1) // stride[0] + 1
    return acc.transpose(1, 2).reshape(n, cout, hout, -1)


@given(
    st.integers(1, 2),
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(4, 9),
    st.integers(1, 2),
    st.integers(0, 2),
    st.integers(1, 2),
)
def test_conv2d_accumulator_is_exact_im2col(n, cin, cout, k, size, stride, padding, dilation):
    torch.manual_seed(n * 100 + cin)
    if dilation * (k - 1) + 1 > size + 2 * padding:
        return
    x = torch.randn(n, cin, size, size + 1) * 3
    w = torch.randn(cout, cin, k, k)
    xq, _ = ref.quantize_activations_per_sample(x)
    wq, ws = ref.quantize_weights(w.flatten(1))
    ints = ref.unpack_weights(wq, cin * k * k).reshape(w.shape)
    got = ref.lowbit_conv_accumulate(xq, wq, w.shape, [stride] * 2, [padding] * 2, [dilation] * 2, 1)
    assert got.dtype == torch.int32
    torch.testing.assert_close(got, im2col_accumulate(xq, ints, [stride] * 2, [padding] * 2, [dilation] * 2), **EXACT)


def test_grouped_conv_is_per_group_concat_and_conv1d_matches_conv2d():
    torch.manual_seed(0)
    x, w = torch.randn(2, 6, 7, 7), torch.randn(4, 3, 3, 3)
    xq, _ = ref.quantize_activations_per_sample(x)
    wq, _ = ref.quantize_weights(w.flatten(1))
    got = ref.lowbit_conv_accumulate(xq, wq, w.shape, [1, 1], [1, 1], [1, 1], 2)
    parts = [
        ref.lowbit_conv_accumulate(
            xq[:, 3 * g : 3 * g + 3], wq[2 * g : 2 * g + 2], (2, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1
        )
        for g in range(2)
    ]
    torch.testing.assert_close(got, torch.cat(parts, 1), **EXACT)
    w1 = torch.randn(5, 6, 3)
    wq1, _ = ref.quantize_weights(w1.flatten(1))
    one = ref.lowbit_conv_accumulate(xq[:, :, 0], wq1, w1.shape, [2], [1], [1], 1)
    two = ref.lowbit_conv_accumulate(xq[:, :, :1], wq1, (5, 6, 1, 3), [1, 2], [0, 1], [1, 1], 1)
    torch.testing.assert_close(one, two[:, :, 0], **EXACT)


def test_per_sample_scale_keeps_zero_padding_exact_and_scales_per_sample():
    x = torch.randn(3, 2, 4, 4) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    q, s = ref.quantize_activations_per_sample(x)
    assert s.shape == (3, 1, 1, 1)
    torch.testing.assert_close(s.flatten(), x.abs().flatten(1).amax(1) / 127)
    assert q.abs().amax() == 127


@pytest.mark.parametrize("per_channel", [False, True])
def test_lowbit_conv_forward_and_ste_grads_match_float_conv_on_dequantized(per_channel):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    xq, xs = torch.ops.bitnet.quantize_activations_per_sample(x, 8)
    wq, ws = torch.ops.bitnet.quantize_weights(w.flatten(1), "ternary", per_channel)
    args = ([2, 1], [1, 2], [1, 2], 2)
    y = torch.ops.bitnet.lowbit_conv(x, w, b, xq, xs, wq, ws, *args)
    xd = (xq.float() * xs).requires_grad_()
    wd = ref.dequantized_weight(wq, ws, 18, torch.float32).reshape(w.shape).requires_grad_()
    bd = b.detach().clone().requires_grad_()
    y_ref = F.conv2d(xd, wd, bd, *args)
    # float32 conv of dequantized operands vs exact int accumulation then scaling: rounding only
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5)  # dL/dx = conv^T(g, W_deq)
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-5, atol=1e-5)  # dL/dW = conv_w(Q(x), g)
    torch.testing.assert_close(b.grad, bd.grad)


def test_opcheck_conv_ops():
    torch.manual_seed(2)
    x, w, b = torch.randn(2, 3, 5), torch.randn(4, 3, 3, requires_grad=True), torch.randn(4)
    xq, xs = torch.ops.bitnet.quantize_activations_per_sample(x, 8)
    wq, ws = torch.ops.bitnet.quantize_weights(w.flatten(1), "ternary", False)
    torch.library.opcheck(torch.ops.bitnet.quantize_activations_per_sample, (x, 8))
    torch.library.opcheck(torch.ops.bitnet.lowbit_conv, (x.requires_grad_(), w, b, xq, xs, wq, ws, [1], [1], [1], 1))
    torch.library.opcheck(
        torch.ops.bitnet.lowbit_conv, (x, w, None, None, None, wq, ws, [2], [0], [1], 1)
    )  # weight-only
    # channels-last stays channels-last, in the fake kernels as in the real ones
    x4 = torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    w4 = torch.randn(4, 3, 3, 3, requires_grad=True)
    xq, xs = torch.ops.bitnet.quantize_activations_per_sample(x4, 8)
    wq, ws = torch.ops.bitnet.quantize_weights(w4.flatten(1), "ternary", False)
    assert xq.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.bitnet.quantize_activations_per_sample, (x4, 8))
    args = (x4.requires_grad_(), w4, b, xq, xs, wq, ws, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.bitnet.lowbit_conv, args)
    assert torch.ops.bitnet.lowbit_conv(*args).is_contiguous(memory_format=torch.channels_last)


class Spellings(nn.Module):
    """conv2d / conv1d as modules, functional calls, 'same'/'valid' padding, aten overloads."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.w4 = nn.Parameter(torch.randn(6, 8, 2, 2) * 0.2)
        self.w5 = nn.Parameter(torch.randn(4, 6, 3) * 0.2)
        self.c6 = nn.Conv1d(4, 4, 3, padding="valid")

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c3(self.c2(x))
        x = torch.ops.aten.convolution.default(x, self.w4, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
        x = F.conv1d(x.flatten(2), self.w5, stride=2)
        return self.c6(torch.ops.aten.gelu.default(x))


def test_compiled_spellings_match_bitconv_reference_and_report():
    torch.manual_seed(3)
    model, x = Spellings().eval(), torch.randn(2, 3, 9, 9)

    class Twin(nn.Module):  # the functional convs as BitConv layers sharing the same weights
        def __init__(self, m):
            super().__init__()
            self.m = reference_model(m).model
            self.c4 = BitConv2d(8, 6, 2, bias=False)
            self.c4.weight = m.w4
            self.c5 = BitConv1d(6, 4, 3, stride=2, bias=False)
            self.c5.weight = m.w5

        def forward(self, x):
            m = self.m
            x = self.c4(m.c3(m.c2(torch.relu(m.c1(x)))))
            return m.c6(F.gelu(self.c5(x.flatten(2))))

    twin = Twin(model)
    assert isinstance(twin.m.c3, BitConv2d) and isinstance(twin.m.c6, BitConv1d)
    with torch.no_grad():
        report = bitcompile.explain(model, x)
        got, want = torch.compile(model, backend="bitnet")(x), twin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # Inductor-fused relu/pad/gelu between layers
    convs = [c for c in report.candidates if c.op.startswith("conv")]
    assert [c.op for c in convs] == ["conv2d"] * 4 + ["conv1d"] * 2 and all(c.rewritten for c in convs), str(report)
    assert report.graph_breaks == 0


def test_depthwise_skipped_by_default_quantized_on_request_and_exclude():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        r = bitcompile.explain(model, x)
        assert [c.rewritten for c in r.candidates] == [False, True]
        assert "depthwise" in r.candidates[0].reason and "quantize_depthwise" in r.candidates[0].reason
        r = bitcompile.explain(model, x, quantize_depthwise=True, exclude=["1"])
        assert [c.rewritten for c in r.candidates] == [True, False]
        assert "excluded" in r.candidates[1].reason
        got = torch.compile(model, backend="bitnet", options={"quantize_depthwise": True, "exclude": ["1"]})(x)
        want = reference_model(model, quantize_depthwise=True, exclude=["1"])(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the excluded float conv runs in Inductor


def test_unsupported_conv_is_skipped_with_reason():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 2, padding="same")  # even kernel: asymmetric 'same'

        def forward(self, x):
            return self.c(x) + F.conv2d(x, torch.ones(3, 2, 1, 1))  # a computed weight

    with torch.no_grad():
        r = bitcompile.explain(Unbatched(), torch.randn(1, 2, 4, 4))
    reasons = [c.reason for c in r.candidates]
    assert any("asymmetric" in s for s in reasons) and any("not a parameter" in s for s in reasons), str(r)
    assert not any(c.rewritten for c in r.candidates)


def test_qat_grads_match_reference_and_dynamic_shapes_do_not_recompile():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 2, 3, stride=2))
    twin = reference_model(model)  # a deep copy: its own parameters, same values
    twin_params = list(twin.model.parameters())
    compiled = torch.compile(model, backend="bitnet", dynamic=True)
    for n, length in [(2, 8), (3, 11), (5, 9)]:
        x = torch.randn(n, 3, length)
        for p in model.parameters():
            p.grad = None
        compiled(x).square().mean().backward()
        got = [p.grad.clone() for p in model.parameters()]
        for p in twin_params:
            p.grad = None
        twin(x).square().mean().backward()
        for g, p in zip(got, twin_params):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # Inference with new batch sizes and lengths: one dynamic graph, no recompiles. (Training
    # graphs with a conv recompile per length under plain Inductor too: its conv backward
    # specializes the length; aot_eager does not.)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.eval()
    with torch.no_grad():
        for n, length in [(2, 8), (3, 11), (5, 9)]:
            x = torch.randn(n, 3, length)
            torch.testing.assert_close(compiled(x), twin(x), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_channels_last_model_compiles_trains_and_keeps_its_layout():
    """A channels-last CNN (the usual layout for conv training on GPUs): the compiled graph's
    stride checks hold (they failed on the conv op before), outputs stay channels-last, values
    and gradients equal the contiguous model's."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2))
    twin = reference_model(model)
    twin_params = list(twin.model.parameters())
    model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="bitnet")
    x = torch.randn(3, 4, 9, 9)
    y = compiled(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = twin(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    want.square().mean().backward()
    for p, q in zip(model.parameters(), twin_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options,dtype",
    [
        ({"activation_bits": None}, torch.float32),
        ({"weight": "int8"}, torch.float32),
        ({"granularity": "per_channel", "activation_bits": 4}, torch.bfloat16),
    ],
)
def test_conv_options_and_dtypes_match_reference(options, dtype):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(dtype).eval()
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    with torch.no_grad():
        got = torch.compile(model, backend="bitnet", options=options)(x)
        want = reference_model(model, **options)(x)
    assert got.dtype == dtype
    # bf16: the float ReLU between the layers is fused by Inductor; one bf16 ulp of slack
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


def test_inference_packs_conv_and_conv1d_projection_weights_once():
    # Conv weights (W.flatten(1)) and GPT-2 Conv1D weights (W.t()) are hoisted like linear
    # weights: packed once by the cache, not re-quantized inside the graph on every call, and
    # re-packed after an update.
    from transformers.pytorch_utils import Conv1D

    from bitcompile.ops import WEIGHT_CACHE

    class ConvAndProjection(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.proj = Conv1D(5, 8)  # GPT-2's projection: weight [in, out], addmm

        def forward(self, x):
            return self.proj(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    model, x = ConvAndProjection().eval(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bitnet")
    with torch.no_grad():
        first = compiled(x)
        assert WEIGHT_CACHE.stats.misses == 2  # packed at compile time
        for _ in range(3):
            assert torch.equal(compiled(x), first)
        assert WEIGHT_CACHE.stats.misses == 2
        torch.testing.assert_close(first, reference_model(model)(x), rtol=1e-5, atol=1e-5)
        model.conv.weight.mul_(-1)
        model.proj.weight.mul_(0.5)
        after = compiled(x)
        assert WEIGHT_CACHE.stats.misses == 4
        torch.testing.assert_close(after, reference_model(model)(x), rtol=1e-5, atol=1e-5)
