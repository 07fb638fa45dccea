"""CUDA implementations of the ``bitnet`` ops: the Triton kernels of ``bitcompile.kernels``
(imported on first call, so importing bitcompile compiles nothing). Configurations a kernel
does not cover (int8 weights, float activations, rows longer than 65536) run the reference
on the same device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.ops import reference as ref
from bitcompile.ops.conv_attention import lowbit_conv, quantize_activations_per_sample
from bitcompile.ops.fused import linear_q, norm_quant
from bitcompile.ops.library import grad_input, lowbit_linear, lowbit_matmul, quantize_activations, quantize_weights


def _packed_ternary(wq: Tensor) -> bool:
    return wq.dtype == torch.uint8


@quantize_activations.register_kernel("cuda")
def _(x, bits):
    from bitcompile.kernels.act_quant import MAX_ROW, norm_quant as kernel

    if x.shape[-1] > MAX_ROW or not x.is_floating_point():
        return ref.quantize_activations(x, bits)
    q, s, _, _ = kernel(x, bits)
    return q, s


@quantize_weights.register_kernel("cuda")
def _(w, scheme, per_channel):
    from bitcompile.kernels.weight_pack import SCHEMES, quantize_pack

    if scheme not in SCHEMES or w.dim() != 2 or not w.is_floating_point():
        return ref.quantize_weights(w, scheme, per_channel)
    return quantize_pack(w, scheme, per_channel)


@lowbit_matmul.register_kernel("cuda")
def _(a, wq, k):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if a.dtype != torch.int8 or not _packed_ternary(wq):
        return ref.lowbit_matmul(a, wq, k)
    return ternary_matmul(a, wq, k, keep=False)


@lowbit_linear.register_kernel("cuda")
def _(x, weight, bias, xq, x_scale, wq, w_scale, grad_input_bits=None):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if xq is None or not _packed_ternary(wq):
        return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])
    return ternary_matmul(xq, wq, x.shape[-1], x_scale, w_scale, bias, x.dtype, keep=False)  # per-step weights


@quantize_activations_per_sample.register_kernel("cuda")
def _(x, bits):
    from bitcompile.kernels.sample_quant import quantize_per_sample

    if x.numel() == 0 or not x.is_floating_point():  # the reference's errors and empty results
        return ref.quantize_activations_per_sample(x, bits)
    return quantize_per_sample(x, bits)


@lowbit_conv.register_kernel("cuda")
def _(x, weight, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups):
    from bitcompile.kernels.conv import ternary_conv

    if xq is None or not _packed_ternary(wq):  # weight-only / int8 weights: the reference
        return ref.lowbit_conv(x, weight.shape, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups)
    return ternary_conv(xq, wq, weight.shape, stride, padding, dilation, groups, x_scale, w_scale, bias, x.dtype,
                        ref.conv_memory_format(x))


@grad_input.register_kernel("cuda")
def _(grad, wq, w_scale, k, bits=None):
    from bitcompile.kernels.act_quant import MAX_ROW
    from bitcompile.kernels.grad_input import grad_input as kernel, grad_input_quantized

    if not _packed_ternary(wq) or (bits is not None and wq.shape[0] > MAX_ROW):
        return ref.grad_input(grad, wq, w_scale, k, bits)
    if bits is not None:
        return grad_input_quantized(grad, wq, w_scale, k, bits)
    return kernel(grad, wq, w_scale, k)


@norm_quant.register_kernel("cuda")
def _(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed, store_sum):
    from bitcompile.kernels.act_quant import norm_quant as kernel

    q, s, y, h = kernel(x, bits, kind, weight, bias, eps, residual, norm_dtype, store_normed, store_sum)
    y = y if store_normed else x.new_empty((0,), dtype=norm_dtype)
    return q, s, y, h if store_sum else x.new_empty((0,))


@linear_q.register_kernel("cuda")
def _(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if not _packed_ternary(wq):
        return ref.linear_epilogue(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual)
    return ternary_matmul(xq, wq, k, x_scale, w_scale, bias, dtype, activation, residual)
