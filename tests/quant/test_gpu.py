"""CUDA runs of the primitives, layers and custom-quantizer backend path (device machine).

The bitnet ops dispatch to the Triton kernels on CUDA; these check the eager and
compiled paths built on them against the CPU reference."""

import copy

import pytest
import torch
from torch import nn

import bitcompile.quant as Q
from bitcompile.nn import TernaryConv2d, TernaryMultiheadAttention, W8A16Linear
from bitcompile.quant import quantized_linear_with
from tests.helpers import MLP

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 96), torch.randn(48, 96), torch.randn(48)
    y_cpu = Q.quantized_linear(x.to(dtype), w.to(dtype), b.to(dtype), True, True)
    y_gpu = Q.quantized_linear(x.to(CUDA, dtype), w.to(CUDA, dtype), b.to(CUDA, dtype), True, True)
    # Same integers; float32 epilogue on both; bf16 output rounding at most 1 ulp apart.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **tol)
    t = Q.ternary_quantize(w.to(CUDA))
    assert torch.equal(t.pack().cpu(), Q.ternary_quantize(w).pack())


def test_custom_quantizer_through_the_backend_on_cuda():
    torch.manual_seed(0)
    model, quantizer = MLP().to(CUDA), Q.LSQQuantizer(4, step=0.05).to(CUDA)
    ref_model, ref_quantizer = copy.deepcopy(model), copy.deepcopy(quantizer)
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer, "strict": True})
    x = torch.randn(4, 12, device=CUDA)
    y = compiled(x)
    h = torch.relu(quantized_linear_with(ref_quantizer, x, ref_model.fc1.weight, ref_model.fc1.bias, 8, "fc1"))
    h = torch.relu(quantized_linear_with(ref_quantizer, h, ref_model.fc2.weight, ref_model.fc2.bias, 8, "fc2"))
    y_ref = ref_model.lm_head(h)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(quantizer.step.grad, ref_quantizer.step.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(model.fc1.weight.grad, ref_model.fc1.weight.grad, rtol=1e-3, atol=1e-5)


def test_layers_cuda_match_cpu():
    torch.manual_seed(0)
    attn = TernaryMultiheadAttention(64, 4, batch_first=True)
    conv = TernaryConv2d(3, 8, 3, padding=1, activation_bits=8)
    lin = W8A16Linear.from_linear(nn.Linear(64, 32))
    x, img = torch.randn(2, 10, 64), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        cpu = (attn(x)[0], conv(img), lin(x))
        gpu = (
            copy.deepcopy(attn).to(CUDA)(x.to(CUDA))[0],
            copy.deepcopy(conv).to(CUDA)(img.to(CUDA)),
            copy.deepcopy(lin).to(CUDA)(x.to(CUDA)),
        )
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
