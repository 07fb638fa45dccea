"""Quantized convolutions (conv1d / conv2d).

``lowbit_conv`` mirrors ``lowbit_linear``: forward on the quantized operands (per-sample int8
activations, 2-bit weights packed from ``W.flatten(1)``), STE backward through both. Only a
per-sample activation scale factors out of a convolution's sum over channels *and* kernel
positions, so the conv has its own activation quantizer. On CUDA both run Triton kernels
(``kernels/sample_quant.py``, the implicit-GEMM ``kernels/conv.py``) where they apply.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.numerics import reference as ref
from bitcompile.ops.common import no_gradient, packed_ternary, quantizer_setup


@torch.library.custom_op("bitnet::quantize_activations_per_sample", mutates_args=())
def quantize_activations_per_sample(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x [N, C, ...] -> (int8 [N, C, ...], float32 [N, 1, ...])``: one absmax scale per sample;
    the integers channels-last (channel stride 1), the conv kernel's layout."""
    return ref.quantize_activations_per_sample(x, bits)


@quantize_activations_per_sample.register_fake
def _(x, bits):
    return ref.channels_last_empty(x, torch.int8), x.new_empty(
        (x.shape[0], *([1] * (x.dim() - 1))), dtype=torch.float32
    )


quantize_activations_per_sample.register_autograd(no_gradient, setup_context=quantizer_setup)


@torch.library.custom_op("bitnet::lowbit_conv", mutates_args=())
def lowbit_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    xq: Optional[Tensor],
    x_scale: Optional[Tensor],
    wq: Tensor,
    w_scale: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """conv1d / conv2d on packed low-bit weights with the dequantize epilogue. ``x`` and
    ``weight`` are the latent tensors (they carry the STE gradients; ``weight`` is read only
    for its shape). ``w_scale`` is ``[1]`` or ``[C_out]``; ``x_scale`` is ``[N, 1, ...]``."""
    return ref.lowbit_conv(x, weight.shape, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups)


@lowbit_conv.register_fake
def _(x, weight, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups):
    conv = ref._conv_fn(x.dim() - 2)
    y = conv(x, weight.to(x.dtype), None, stride, padding, dilation, groups)
    return y.contiguous(memory_format=ref.conv_memory_format(x))


@torch.library.custom_op("bitnet::dequantize_weight", mutates_args=())
def dequantize_weight(wq: Tensor, w_scale: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """``W_int * s_w`` as ``[N, K]`` in ``dtype`` (an op so tracing never inspects the codes)."""
    return ref.dequantized_weight(wq, w_scale, k, dtype)


@dequantize_weight.register_fake
def _(wq, w_scale, k, dtype):
    return wq.new_empty((wq.shape[0], k), dtype=dtype)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
    ctx.weight_shape = weight.shape
    ctx.has_bias = bias is not None
    ctx.weight_only = xq is None
    ctx.save_for_backward(x if xq is None else xq, x_scale, wq, w_scale)


def _conv_backward(ctx, grad):
    a, x_scale, wq, w_scale = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    k = ctx.weight_shape.numel() // ctx.weight_shape[0]
    w_deq = dequantize_weight(wq, w_scale, k, grad.dtype).reshape(ctx.weight_shape)
    a_deq = a.to(grad.dtype) if ctx.weight_only else ref.dequantized_activations(a, x_scale, grad.dtype)
    spatial = a.dim() - 2
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad,
        a_deq,
        w_deq,
        None,
        stride,
        padding,
        dilation,
        False,
        [0] * spatial,
        groups,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
    )
    gb = grad.sum([d for d in range(grad.dim()) if d != 1]) if ctx.has_bias and ctx.needs_input_grad[2] else None
    gx = gx.to(ctx.x_dtype) if gx is not None else None
    gw = gw.to(ctx.weight_dtype) if gw is not None else None
    return gx, gw, gb, None, None, None, None, None, None, None, None


lowbit_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


@quantize_activations_per_sample.register_kernel("cuda")
def _(x, bits):
    from bitcompile.kernels.sample_quant import quantize_per_sample

    if x.numel() == 0 or not x.is_floating_point():  # the reference's errors and empty results
        return ref.quantize_activations_per_sample(x, bits)
    return quantize_per_sample(x, bits)


@lowbit_conv.register_kernel("cuda")
def _(x, weight, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups):
    from bitcompile.kernels.conv import ternary_conv

    if xq is None or not packed_ternary(wq):  # weight-only / int8 weights: the reference
        return ref.lowbit_conv(x, weight.shape, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups)
    return ternary_conv(
        xq,
        wq,
        weight.shape,
        stride,
        padding,
        dilation,
        groups,
        x_scale,
        w_scale,
        bias,
        x.dtype,
        ref.conv_memory_format(x),
    )
