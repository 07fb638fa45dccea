"""The ``bitnet`` torch.library namespace: the linear ops (convolution and attention ops
in ``conv_attention``, the fusions' ops in ``fused``, CUDA kernels registered in ``cuda``).

Each op has a plain-torch implementation (``ops.reference``, the oracle; it runs on
any device until a faster kernel is registered for that device), a fake
implementation for tracing, and an autograd rule. The straight-through estimator
lives on ``lowbit_linear``, the only op with float inputs and a float output:
forward runs on the quantized operands, backward treats both quantizers as the
identity, so ``dL/dx = g @ (W_int * s_w)`` and ``dL/dW = g^T @ (q * s_x)``. With
``grad_input_bits`` set, ``dL/dx`` uses g quantized per row to that many bits instead
(``ops.reference.grad_input_quantized``): an int8 tensor-core matmul in place of a 16-bit one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.ops import reference as ref


@torch.library.custom_op("bitnet::quantize_activations", mutates_args=())
def quantize_activations(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-token absmax quantization: ``x [..., K] -> (int8 [..., K], float32 [..., 1])``."""
    return ref.quantize_activations(x, bits)


@quantize_activations.register_fake
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("bitnet::quantize_weights", mutates_args=())
def quantize_weights(w: Tensor, scheme: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """``W [N, K] -> (packed uint8 [N, ceil(K/4)] | int8 [N, K], float32 scale [N] | [1])``."""
    return ref.quantize_weights(w, scheme, per_channel)


@quantize_weights.register_fake
def _(w, scheme, per_channel):
    n, k = w.shape
    wq = w.new_empty((n, k), dtype=torch.int8) if scheme == "int8" else w.new_empty((n, (k + 3) // 4), dtype=torch.uint8)
    return wq, w.new_empty((n if per_channel else 1,), dtype=torch.float32)


@torch.library.custom_op("bitnet::lowbit_matmul", mutates_args=())
def lowbit_matmul(a: Tensor, wq: Tensor, k: int) -> Tensor:
    """``a @ W_int^T``: exact int32 for int8 ``a``, float32 for a float ``a``."""
    return ref.lowbit_matmul(a, wq, k)


@lowbit_matmul.register_fake
def _(a, wq, k):
    return a.new_empty((*a.shape[:-1], wq.shape[0]), dtype=torch.int32 if a.dtype == torch.int8 else torch.float32)


@torch.library.custom_op("bitnet::dequantize", mutates_args=())
def dequantize(acc: Tensor, x_scale: Optional[Tensor], w_scale: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``acc * s_x * s_w (+ bias)`` computed in float32, returned as ``dtype``."""
    return ref.dequantize(acc, x_scale, w_scale, bias, dtype)


@dequantize.register_fake
def _(acc, x_scale, w_scale, bias, dtype):
    return acc.new_empty(acc.shape, dtype=dtype)


@torch.library.custom_op("bitnet::lowbit_linear", mutates_args=())
def lowbit_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: Optional[Tensor], x_scale: Optional[Tensor], wq: Tensor,
    w_scale: Tensor, grad_input_bits: Optional[int] = None,
) -> Tensor:
    """Packed low-bit matmul with the dequantize epilogue. ``x`` and ``weight`` are the
    latent full-precision tensors: they carry the STE gradients (``weight`` is not read
    in the forward). ``xq``/``x_scale`` are None for weight-only quantization.
    ``grad_input_bits`` only changes the backward (see the module docstring)."""
    return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])


@lowbit_linear.register_fake
def _(x, weight, bias, xq, x_scale, wq, w_scale, grad_input_bits=None):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@torch.library.custom_op("bitnet::grad_input", mutates_args=())
def grad_input(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, bits: Optional[int] = None) -> Tensor:
    """STE input gradient ``grad @ (W_int * s_w)`` in ``grad.dtype``; with ``bits``, from
    ``grad`` quantized per row (``ops.reference.grad_input_quantized``)."""
    return ref.grad_input(grad, wq, w_scale, k, bits)


@grad_input.register_fake
def _(grad, wq, w_scale, k, bits=None):
    return grad.new_empty((*grad.shape[:-1], k))


# --- autograd ---------------------------------------------------------------


def quantizer_setup(ctx, inputs, output):
    # The quantizers' own outputs are integers and scales: the STE gradient is
    # produced by lowbit_linear, so nothing flows back through these ops.
    ctx.mark_non_differentiable(*output)
    ctx.n_inputs = len(inputs)


def no_gradient(ctx, *grads):
    return (None,) * ctx.n_inputs


quantize_activations.register_autograd(no_gradient, setup_context=quantizer_setup)
quantize_weights.register_autograd(no_gradient, setup_context=quantizer_setup)


def linear_setup(ctx, inputs, output):
    x, weight, bias, xq, x_scale, wq, w_scale, ctx.grad_input_bits = inputs
    ctx.k = x.shape[-1]
    ctx.weight_dtype = weight.dtype
    ctx.has_bias = bias is not None
    # Save the quantized operands (int8 / 2-bit), not the float ones: the STE backward
    # uses exactly what the forward multiplied. Weight-only mode keeps x itself.
    ctx.weight_only = xq is None
    ctx.save_for_backward(x if xq is None else xq, x_scale, wq, w_scale)


def linear_backward(grad_input_op):
    """``lowbit_linear``'s STE backward, its input gradient from ``grad_input_op``
    (``bitnet::grad_input``, or its Inductor-visible twin for ``lowbit_linear_triton``)."""

    def backward(ctx, grad):
        a, x_scale, wq, w_scale = ctx.saved_tensors
        gx = gw = gb = None
        n = wq.shape[0]
        g2 = grad.reshape(-1, n)
        if ctx.needs_input_grad[0]:
            gx = grad_input_op(grad, wq, w_scale, ctx.k, ctx.grad_input_bits)
        if ctx.needs_input_grad[1]:
            a_deq = a.to(grad.dtype) if ctx.weight_only else ref.dequantized_activations(a, x_scale, grad.dtype)
            gw = (g2.t() @ a_deq.reshape(-1, ctx.k)).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None, None, None

    return backward


lowbit_linear.register_autograd(linear_backward(grad_input), setup_context=linear_setup)


# nn.TransformerEncoderLayer's inference fast path is one aten op that the attention pass
# decomposes. Some torch builds (2.11 on the GPU machine) have no Meta kernel for it, so Dynamo cannot trace it with dynamic
# shapes and graph-breaks, running the layer unquantized in eager. Its output has src's shape.
if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_transformer_encoder_layer_fwd", "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")
    _ATEN_META.impl("_transformer_encoder_layer_fwd", lambda src, *args, **kwargs: torch.empty_like(src), "Meta")
