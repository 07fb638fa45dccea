"""The ``bitnet`` torch.library namespace.

Each op has a plain-torch implementation (``ops.reference``, the oracle; it runs on
any device until a faster kernel is registered for that device), a fake
implementation for tracing, and an autograd rule. The straight-through estimator
lives on ``lowbit_linear``, the only op with float inputs and a float output:
forward runs on the quantized operands, backward treats both quantizers as the
identity, so ``dL/dx = g @ (W_int * s_w)`` and ``dL/dW = g^T @ (q * s_x)``.
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
    x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: Optional[Tensor], x_scale: Optional[Tensor], wq: Tensor, w_scale: Tensor
) -> Tensor:
    """Packed low-bit matmul with the dequantize epilogue. ``x`` and ``weight`` are the
    latent full-precision tensors: they carry the STE gradients (``weight`` is not read
    in the forward). ``xq``/``x_scale`` are None for weight-only quantization."""
    return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])


@lowbit_linear.register_fake
def _(x, weight, bias, xq, x_scale, wq, w_scale):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@torch.library.custom_op("bitnet::grad_input", mutates_args=())
def grad_input(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int) -> Tensor:
    """STE input gradient ``grad @ (W_int * s_w)`` in ``grad.dtype``."""
    return grad @ ref.dequantized_weight(wq, w_scale, k, grad.dtype)


@grad_input.register_fake
def _(grad, wq, w_scale, k):
    return grad.new_empty((*grad.shape[:-1], k))


# --- autograd ---------------------------------------------------------------


def _quantizer_setup(ctx, inputs, output):
    # The quantizers' own outputs are integers and scales: the STE gradient is
    # produced by lowbit_linear, so nothing flows back through these ops.
    ctx.mark_non_differentiable(*output)
    ctx.n_inputs = len(inputs)


def _no_grad(ctx, *grads):
    return (None,) * ctx.n_inputs


quantize_activations.register_autograd(_no_grad, setup_context=_quantizer_setup)
quantize_weights.register_autograd(_no_grad, setup_context=_quantizer_setup)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, xq, x_scale, wq, w_scale = inputs
    ctx.k = x.shape[-1]
    ctx.weight_dtype = weight.dtype
    ctx.has_bias = bias is not None
    # Save the quantized operands (int8 / 2-bit), not the float ones: the STE backward
    # uses exactly what the forward multiplied. Weight-only mode keeps x itself.
    ctx.weight_only = xq is None
    ctx.save_for_backward(x if xq is None else xq, x_scale, wq, w_scale)


def _linear_backward(ctx, grad):
    a, x_scale, wq, w_scale = ctx.saved_tensors
    gx = gw = gb = None
    n = wq.shape[0]
    g2 = grad.reshape(-1, n)
    if ctx.needs_input_grad[0]:
        gx = grad_input(grad, wq, w_scale, ctx.k)
    if ctx.needs_input_grad[1]:
        a_deq = a.to(grad.dtype) if ctx.weight_only else ref.dequantized_activations(a, x_scale, grad.dtype)
        gw = (g2.t() @ a_deq.reshape(-1, ctx.k)).to(ctx.weight_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g2.sum(0)
    return gx, gw, gb, None, None, None, None


lowbit_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- convolution and attention matmuls (issue 4) ------------------------------
# lowbit_conv mirrors lowbit_linear: forward on the quantized operands (per-sample int8
# activations, 2-bit weights packed from W.flatten(1)), STE backward through both.
# quantized_attention_matmul is int8 x int8 of two activations with per-head scales.


@torch.library.custom_op("bitnet::quantize_activations_per_sample", mutates_args=())
def quantize_activations_per_sample(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x [N, ...] -> (int8 [N, ...], float32 [N, 1, ...])``: one absmax scale per sample."""
    return ref.quantize_activations_per_sample(x, bits)


@quantize_activations_per_sample.register_fake
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], *([1] * (x.dim() - 1))), dtype=torch.float32)


quantize_activations_per_sample.register_autograd(_no_grad, setup_context=_quantizer_setup)


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
    return conv(x, weight.to(x.dtype), None, stride, padding, dilation, groups)


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


# --- fused ops (kernels issue) ------------------------------------------------


@torch.library.custom_op("bitnet::norm_quant", mutates_args=())
def norm_quant(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], kind: str, eps: float,
    bits: int, norm_dtype: torch.dtype, store_normed: bool, store_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h = x (+ residual)``, ``y = norm(h)`` (``kind``: rms | rms_fp32 | layer | none), then
    per-token quantization of ``y``. Returns ``(q, scale, y, h)``; ``y`` and ``h`` are empty
    unless ``store_normed`` / ``store_sum`` (the fused kernel then never writes them)."""
    q, s, y, h = ref.norm_quant(x, residual, weight, bias, kind, eps, bits, norm_dtype)
    # Outputs may not alias inputs or each other: fresh (empty) tensors where not stored.
    y = y.clone() if store_normed else x.new_empty((0,), dtype=norm_dtype)
    return q, s, y, h.clone() if store_sum else x.new_empty((0,))


@norm_quant.register_fake
def _(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed, store_sum):
    lead, k = x.shape[:-1], x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*lead, 1), dtype=torch.float32),
        x.new_empty(x.shape if store_normed else (0,), dtype=norm_dtype),
        x.new_empty(x.shape if store_sum else (0,)),
    )


@torch.library.custom_op("bitnet::linear_q", mutates_args=())
def linear_q(
    xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int, dtype: torch.dtype,
    activation: str, residual: Optional[Tensor],
) -> Tensor:
    """Inference linear from already-quantized activations with the fused epilogue
    ``act(acc * s_w * s_x + bias) (+ residual)`` cast to ``dtype`` (no gradients)."""
    return ref.linear_epilogue(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual)


@linear_q.register_fake
def _(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=dtype)


# --- CUDA: Triton kernels (bitcompile.kernels); unsupported configurations use the reference


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
    return ternary_matmul(a, wq, k)


@lowbit_linear.register_kernel("cuda")
def _(x, weight, bias, xq, x_scale, wq, w_scale):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if xq is None or not _packed_ternary(wq):
        return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])
    return ternary_matmul(xq, wq, x.shape[-1], x_scale, w_scale, bias, x.dtype)


@lowbit_conv.register_kernel("cuda")
def _(x, weight, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups):
    from bitcompile.kernels.conv import ternary_conv

    if xq is None or not _packed_ternary(wq):  # weight-only / int8 weights: the reference
        return ref.lowbit_conv(x, weight.shape, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups)
    return ternary_conv(xq, wq, weight.shape, stride, padding, dilation, groups, x_scale, w_scale, bias, x.dtype)


@grad_input.register_kernel("cuda")
def _(grad, wq, w_scale, k):
    from bitcompile.kernels.grad_input import grad_input as kernel

    if not _packed_ternary(wq):
        return grad @ ref.dequantized_weight(wq, w_scale, k, grad.dtype)
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


# nn.TransformerEncoderLayer's inference fast path is one aten op that the attention pass
# decomposes. Some torch builds (2.11 on the GPU machine) have no Meta kernel for it, so Dynamo cannot trace it with dynamic
# shapes and graph-breaks, running the layer unquantized in eager. Its output has src's shape.
if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_transformer_encoder_layer_fwd", "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")
    _ATEN_META.impl("_transformer_encoder_layer_fwd", lambda src, *args, **kwargs: torch.empty_like(src), "Meta")
