"""``reference_model`` is a faithful oracle: it keeps in float exactly the layers the backend skips,
for the same reasons, and quantizes the rest; a compiled model matches its twin."""

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.nn import BitConv1d, BitConv2d, BitLinear, reference_model


def with_buffer_weight(layer: nn.Linear) -> nn.Linear:
    """``layer`` with its weight a buffer, not a parameter (the backend leaves such a linear in float)."""
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.register_buffer("weight", weight)
    return layer


class Mixed(nn.Module):
    """Two layers the backend rewrites and one of each kind it skips."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)  # rewritten
        self.same = nn.Conv1d(4, 4, 2, padding="same")  # even kernel: asymmetric padding
        self.depthwise = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 8)  # rewritten
        self.buffered = with_buffer_weight(nn.Linear(8, 8))
        self.empty = nn.Linear(8, 0)
        self.lm_head = nn.Linear(8, 3)  # excluded by default

    def forward(self, x):
        h = self.buffered(self.fc(self.depthwise(self.same(self.conv(x)))))
        return self.lm_head(h), self.empty(h)


def swapped(twin) -> set:
    return {path for path, m in twin.model.named_modules() if isinstance(m, (BitLinear, BitConv1d, BitConv2d))}


def test_twin_skips_exactly_what_the_backend_skips_for_the_same_reasons():
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 2, 8)
    twin = reference_model(model)
    with torch.no_grad():
        report = bitcompile.explain(model, x)
        assert {c.module for c in report.rewritten} == swapped(twin) == {"conv", "fc"}
        assert sorted(c.reason for c in report.skipped) == sorted(twin.skipped.values())
        assert twin.skipped["empty"] == "zero output features"
        assert twin.skipped["buffered"] == "weight is not a parameter (computed or passed in)"
        assert type(twin.model.buffered) is nn.Linear and type(twin.model.same) is nn.Conv1d  # the originals
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bitnet")
        for got, want in zip(compiled(x), twin(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_twin_keeps_layers_of_dtypes_the_backend_does_not_take(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.Linear(5, 3, dtype=dtype))
    x = torch.randn(4, 6, dtype=dtype)
    twin = reference_model(model)
    assert not swapped(twin) and set(twin.skipped) == {"0", "1"}
    assert all(r.startswith("unsupported dtype W=") for r in twin.skipped.values())
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    report = bitcompile.explain(model, x)
    assert not report.rewritten and all("unsupported dtype" in c.reason for c in report.skipped)


def test_twin_runs_unbatched_conv_input_in_float_as_the_backend_does():
    torch.manual_seed(0)
    model, x = nn.Conv1d(2, 4, 3), torch.randn(2, 8)  # unbatched: [C, L]
    twin = reference_model(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert "unbatched input" in bitcompile.explain(model, x).skipped[0].reason
    batched = torch.randn(1, 2, 8)
    assert not torch.equal(twin(batched), model(batched))  # batched input is still quantized


def test_twin_quantizes_the_input_gradient_where_the_backend_does():
    # grad_input_bits applies to linears, GPT-2's Conv1D projections included: the twin's input
    # gradient equals the compiled model's bit for bit, with and without it; the parameter
    # gradients to fp32 summation order (Inductor's kernels sum the bias gradient in their own order).
    from transformers.pytorch_utils import Conv1D

    class Projections(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(8, 12), Conv1D(6, 12)  # Conv1D(nf=out, nx=in)

        def forward(self, x):
            return self.proj(self.fc(x).relu())

    torch.manual_seed(0)
    model, x = Projections(), torch.randn(5, 8)
    input_grads = {}
    for bits in (None, 4):
        grads = []
        for side in (torch.compile(model, backend="bitnet", options={"grad_input_bits": bits}),
                     reference_model(model, grad_input_bits=bits)):  # fmt: skip
            model.zero_grad()
            xs = x.clone().requires_grad_()
            side(xs).square().sum().backward()
            grads.append([xs.grad] + [p.grad.clone() for p in side.parameters()])
        torch._dynamo.reset()
        assert torch.equal(grads[0][0], grads[1][0]), bits
        for got, want in zip(grads[0][1:], grads[1][1:], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=str(bits))
        input_grads[bits] = grads[0][0]
    assert not torch.equal(input_grads[None], input_grads[4])  # the option is in effect
