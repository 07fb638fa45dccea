"""Every bitnet op's fake (traced) outputs agree with its real outputs for any input layout:
transposed, sliced and channels-last inputs, not only contiguous ones. A disagreement fails a
compiled graph's stride check (a conv front end, a transpose, then LayerNorm and linears)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile.nn
import bitcompile.ops  # noqa: F401

bitnet = torch.ops.bitnet


def layouts(shape):
    """Tensors of ``shape`` laid out contiguously, transposed in memory, and as a strided slice."""
    contiguous = torch.randn(shape)
    transposed = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-2, -1)
    sliced = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    return {"contiguous": contiguous, "transposed": transposed, "sliced": sliced}


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_opcheck_on_every_layout(layout):
    torch.manual_seed(0)
    x = layouts((2, 5, 12))[layout]
    r = layouts((2, 5, 12))[layout]
    w, b = torch.randn(6, 12), torch.randn(6)
    torch.library.opcheck(bitnet.quantize_activations, (x, 8))
    torch.library.opcheck(bitnet.quantize_weights, (layouts((6, 12))[layout], "ternary", False))
    for store_normed in (False, True):
        for store_sum in (False, True):
            args = (x, r, torch.rand(12) + 0.5, None, "layer", 1e-5, 8, torch.float32, store_normed, store_sum)
            torch.library.opcheck(bitnet.norm_quant, args)
    xq, xs = bitnet.quantize_activations(x, 8)
    wq, ws = bitnet.quantize_weights(w, "ternary", False)
    xg = x.detach().clone().requires_grad_()
    torch.library.opcheck(bitnet.lowbit_linear, (xg, w.requires_grad_(), b, xq, xs, wq, ws))
    torch.library.opcheck(bitnet.linear_q, (xq, xs, wq, ws, b, 12, torch.float32, "silu", layouts((2, 5, 6))[layout]))
    torch.library.opcheck(bitnet.grad_input, (layouts((2, 5, 6))[layout], wq, ws, 12))
    a, c = layouts((2, 3, 4, 8))[layout], layouts((2, 3, 8, 4))[layout]
    torch.library.opcheck(bitnet.quantized_attention_matmul, (a, c, 8))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_ops_on_both_memory_formats(memory_format):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=memory_format)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.library.opcheck(bitnet.quantize_activations_per_sample, (x, 8))
    xq, xs = bitnet.quantize_activations_per_sample(x, 8)
    wq, ws = bitnet.quantize_weights(w.detach().flatten(1), "ternary", False)
    args = (x.clone().requires_grad_(), w, None, xq, xs, wq, ws, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(bitnet.lowbit_conv, args)


class SpeechEncoder(nn.Module):
    """A conv front end, a transpose, then LayerNorm and linears (the layout of speech encoders)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(self.conv(x).transpose(1, 2))
        return self.fc2(F.gelu(self.fc1(h)))


@pytest.mark.parametrize("grad", [False, True])
def test_transposed_activations_into_norm_and_linears_compile(grad):
    torch.manual_seed(0)
    model = SpeechEncoder()
    twin = bitcompile.nn.reference_model(model)
    x = torch.randn(2, 4, 10)
    with torch.set_grad_enabled(grad):
        got = torch.compile(model, backend="bitnet", options={"strict": True})(x)
        want = twin(x)
    # The fused norm (inference and QAT) orders its float operations differently from Inductor's
    # LayerNorm; a value on a rounding boundary takes the other int8 code (README, Fusions):
    # bounded as in the fusion tests.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    if grad:
        got.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
