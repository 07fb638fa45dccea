"""The ``bitnet`` ops for convolutions and attention matmuls (graph coverage).

``lowbit_conv`` mirrors ``lowbit_linear``: forward on the quantized operands (per-sample
int8 activations, 2-bit weights packed from ``W.flatten(1)``), STE backward through both.
``quantized_attention_matmul`` is int8 x int8 of two activations with per-head scales.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.ops import reference as ref
from bitcompile.ops.library import no_gradient, quantizer_setup


@torch.library.custom_op("bitnet::quantize_activations_per_sample", mutates_args=())
def quantize_activations_per_sample(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x [N, C, ...] -> (int8 [N, C, ...], float32 [N, 1, ...])``: one absmax scale per sample;
    the integers channels-last (channel stride 1), the conv kernel's layout."""
    return ref.quantize_activations_per_sample(x, bits)


@quantize_activations_per_sample.register_fake
def _(x, bits):
    return ref.channels_last_empty(x, torch.int8), x.new_empty((x.shape[0], *([1] * (x.dim() - 1))), dtype=torch.float32)


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
        grad, a_deq, w_deq, None, stride, padding, dilation, False, [0] * spatial, groups,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
    )
    gb = grad.sum([d for d in range(grad.dim()) if d != 1]) if ctx.has_bias and ctx.needs_input_grad[2] else None
    gx = gx.to(ctx.x_dtype) if gx is not None else None
    gw = gw.to(ctx.weight_dtype) if gw is not None else None
    return gx, gw, gb, None, None, None, None, None, None, None, None


lowbit_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("bitnet::quantized_attention_matmul", mutates_args=())
def quantized_attention_matmul(a: Tensor, b: Tensor, bits: int) -> Tensor:
    """``Q(a) @ Q(b)``, both int8 (``bits``) with one absmax scale per (batch, head) matrix,
    accumulated exactly; output in ``a.dtype``. Shapes as ``torch.matmul`` of >= 3-D tensors."""
    return ref.quantized_attention_matmul(a, b, bits)


@quantized_attention_matmul.register_fake
def _(a, b, bits):
    return torch.matmul(a, b.to(a.dtype))


def _attn_setup(ctx, inputs, output):
    a, b, bits = inputs
    ctx.bits = bits
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.save_for_backward(a, b)


def _attn_backward(ctx, grad):
    # STE: the gradient of Q(a) @ Q(b) with both quantizers taken as identity, using the
    # quantized operands the forward multiplied.
    a, b = ctx.saved_tensors
    qa, sa = ref.quantize_per_head(a, ctx.bits)
    qb, sb = ref.quantize_per_head(b, ctx.bits)
    a_deq, b_deq, g = qa.float() * sa, qb.float() * sb, grad.float()
    ga = gb = None
    if ctx.needs_input_grad[0]:
        ga = _unbroadcast(g @ b_deq.transpose(-2, -1), a.shape).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        gb = _unbroadcast(a_deq.transpose(-2, -1) @ g, b.shape).to(ctx.dtypes[1])
    return ga, gb, None


def _unbroadcast(g: Tensor, shape) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    dims = [i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1]
    return g.sum(dims, keepdim=True) if dims else g


quantized_attention_matmul.register_autograd(_attn_backward, setup_context=_attn_setup)

