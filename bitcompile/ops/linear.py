"""Quantized linears: the packed low-bit matmul, its dequantize epilogue, and the STE.

``lowbit_linear`` is the only op with float inputs and a float output: forward runs on the
quantized operands, backward treats both quantizers as the identity, so
``dL/dx = g @ (W_int * s_w)`` (``grad_input``) and ``dL/dW = g^T @ (q * s_x)``. With
``grad_input_bits`` set, ``dL/dx`` uses g quantized per row to that many bits instead
(``reference.grad_input_quantized``): an int8 tensor-core matmul in place of a 16-bit one.

On CUDA the matmuls run the Triton kernels where ``kernel_supports`` says they apply (int8
activations and 2-bit packed weights), the weight-only int8 kernel for float activations and
int8 weights (``int8_weights_only``; also ``weight_only_linear``, the deployed weight-only
layer's op), the reference elsewhere. The ``*_triton`` twins launch
the same kernels from Inductor's code in graphs with static shapes.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from bitcompile.numerics import reference as ref
from bitcompile.ops.common import bitnet_op, packed_scheme, packed_ternary, require_static, twin


@bitnet_op("bitnet::lowbit_matmul")
def lowbit_matmul(a: Tensor, wq: Tensor, k: int) -> Tensor:
    """``a @ W_int^T``: exact int32 for int8 ``a``, float32 for a float ``a``."""
    return ref.lowbit_matmul(a, wq, k)


@lowbit_matmul.register_fake
def _(a, wq, k):
    return a.new_empty((*a.shape[:-1], wq.shape[0]), dtype=torch.int32 if a.dtype == torch.int8 else torch.float32)


def kernel_supports(xq: Optional[Tensor], wq: Tensor) -> bool:
    """The matmul kernels multiply int8 activations by 2-bit packed weights."""
    return xq is not None and xq.dtype == torch.int8 and packed_ternary(wq)


def kernel_supports_scheme(scheme: str) -> bool:
    """Weights quantized with ``scheme`` reach the matmul kernels (the 2-bit packed schemes)."""
    return packed_scheme(scheme)


def int8_weights_only(x: Tensor, wq: Tensor) -> bool:
    """Float activations times int8 weights: the weight-only int8 kernel's operands."""
    return x.is_floating_point() and wq.dtype == torch.int8


def _int8_weight_kernel(x, wq, w_scale, bias=None, out_dtype=None):
    from bitcompile.kernels.int8_weight_matmul import int8_weight_matmul

    return int8_weight_matmul(x, wq, w_scale, bias, out_dtype)


@lowbit_matmul.register_kernel("cuda")
def _(a, wq, k):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if int8_weights_only(a, wq):  # the float32 accumulator: a unit scale, float32 out
        return _int8_weight_kernel(a, wq, a.new_ones(1, dtype=torch.float32), out_dtype=torch.float32)
    if not kernel_supports(a, wq):
        return ref.lowbit_matmul(a, wq, k)
    return ternary_matmul(a, wq, k, keep=False)


@bitnet_op("bitnet::dequantize")
def dequantize(
    acc: Tensor, x_scale: Optional[Tensor], w_scale: Tensor, bias: Optional[Tensor], dtype: torch.dtype
) -> Tensor:
    """``acc * s_x * s_w (+ bias)`` computed in float32, returned as ``dtype``."""
    return ref.dequantize(acc, x_scale, w_scale, bias, dtype)


@dequantize.register_fake
def _(acc, x_scale, w_scale, bias, dtype):
    return acc.new_empty(acc.shape, dtype=dtype)


@bitnet_op("bitnet::lowbit_linear")
def lowbit_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    xq: Optional[Tensor],
    x_scale: Optional[Tensor],
    wq: Tensor,
    w_scale: Tensor,
    grad_input_bits: Optional[int] = None,
    wq_kblocked: Optional[Tensor] = None,
) -> Tensor:
    """Packed low-bit matmul with the dequantize epilogue. ``x`` and ``weight`` are the
    latent full-precision tensors: they carry the STE gradients (``weight`` is not read
    in the forward). ``xq``/``x_scale`` are None for weight-only quantization.
    ``grad_input_bits`` only changes the backward (see the module docstring).
    ``wq_kblocked``: the same codes in the kernels' K-blocked layout, where the caller has
    them (``quantize_weights_kblocked``): the matmul kernel then reads them instead of
    re-laying out ``wq`` (the backward reads ``wq``)."""
    return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])


@lowbit_linear.register_fake
def _(*args):
    a = lowbit_linear.Args(*args)
    return a.x.new_empty((*a.x.shape[:-1], a.wq.shape[0]))


def _linear_kernel(a, wrap=None):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    # Weights re-quantized every step: relaid per call (unless given in both layouts), not kept.
    wq, layout = (a.wq, "canonical") if a.wq_kblocked is None else (a.wq_kblocked, "kblocked")
    return ternary_matmul(
        a.xq, wq, a.x.shape[-1], a.x_scale, a.w_scale, a.bias, a.x.dtype, layout=layout, wrap=wrap, keep=False
    )


@lowbit_linear.register_kernel("cuda")
def _(*args):
    a = lowbit_linear.Args(*args)
    if a.xq is None and int8_weights_only(a.x, a.wq):
        return _int8_weight_kernel(a.x, a.wq, a.w_scale, a.bias)
    if not kernel_supports(a.xq, a.wq):
        return lowbit_linear.prototype(*a)
    return _linear_kernel(a)


@bitnet_op("bitnet::weight_only_linear")
def weight_only_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """Inference linear on quantized weights and float activations, ``(x @ W_int^T) * s_w
    (+ bias)`` computed in float32 and returned as ``x.dtype`` (a deployed weight-only layer:
    no latent weight, no gradient)."""
    return ref.lowbit_linear(x, bias, None, None, wq, w_scale, k)


@weight_only_linear.register_fake
def _(x, wq, w_scale, bias, k):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@weight_only_linear.register_kernel("cuda")
def _(x, wq, w_scale, bias, k):
    if int8_weights_only(x, wq):
        return _int8_weight_kernel(x, wq, w_scale, bias)
    return weight_only_linear.prototype(x, wq, w_scale, bias, k)


@bitnet_op("bitnet::grad_input")
def grad_input(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, bits: Optional[int] = None) -> Tensor:
    """STE input gradient ``grad @ (W_int * s_w)`` in ``grad.dtype``; with ``bits``, from
    ``grad`` quantized per row (``reference.grad_input_quantized``)."""
    return ref.grad_input(grad, wq, w_scale, k, bits)


@grad_input.register_fake
def _(grad, wq, w_scale, k, bits=None):
    return grad.new_empty((*grad.shape[:-1], k))


def grad_kernel_supports(wq: Tensor, bits: Optional[int]) -> bool:
    """The input-gradient kernels read 2-bit packed weights; the quantized one also quantizes
    an output-gradient row of ``N`` in one program (the activation kernel's ``MAX_ROW``)."""
    from bitcompile.kernels.act_quant import MAX_ROW

    return packed_ternary(wq) and (bits is None or wq.shape[0] <= MAX_ROW)


def _grad_kernel(a, wrap=None):
    from bitcompile.kernels import tuning
    from bitcompile.kernels.grad_input import grad_input as exact
    from bitcompile.kernels.grad_input import grad_input_quantized

    if a.bits is not None:
        return grad_input_quantized(a.grad, a.wq, a.w_scale, a.k, a.bits, wrap=wrap)
    grad = a.grad
    if grad.dtype == torch.float32 and not tuning.interpreting():  # (Triton's interpreter has no bfloat16)
        # fp32 output gradients (fp32 training without autocast) reach the tensor-core kernels
        # rounded once to bfloat16 (fp32's range; 2^-9 relative per element, the scale likewise),
        # accumulated in fp32 and returned in fp32: the exact fp32 product runs on CUDA cores,
        # orders of magnitude slower, for a straight-through estimate.
        grad = grad.to(torch.bfloat16)
    return exact(
        grad,
        a.wq,
        a.w_scale,
        a.k,
        wrap=wrap,
        gluon_op=grad_input_ws if wrap is not None else None,
        out_dtype=a.grad.dtype,
    )


@grad_input.register_kernel("cuda")
def _(*args):
    a = grad_input.Args(*args)
    if not grad_kernel_supports(a.wq, a.bits):
        return grad_input.prototype(*a)
    return _grad_kernel(a)


# --- autograd: the STE ------------------------------------------------------------


def _linear_setup(ctx, inputs, output):
    a = lowbit_linear.Args(*inputs)
    ctx.grad_input_bits = a.grad_input_bits
    ctx.k = a.x.shape[-1]
    ctx.weight_dtype = a.weight.dtype
    ctx.has_bias = a.bias is not None
    # Save the quantized operands (int8 / 2-bit), not the float ones: the STE backward
    # uses exactly what the forward multiplied. Weight-only mode keeps x itself.
    ctx.weight_only = a.xq is None
    ctx.save_for_backward(a.x if a.xq is None else a.xq, a.x_scale, a.wq, a.w_scale)


def _linear_backward(grad_input_op):
    """``lowbit_linear``'s STE backward, its input gradient from ``grad_input_op``
    (``bitnet::grad_input``, or its twin for ``lowbit_linear_triton``)."""

    def backward(ctx, grad):
        a, x_scale, wq, w_scale = ctx.saved_tensors
        gx = gw = gb = None
        g2 = grad.reshape(-1, wq.shape[0])
        if ctx.needs_input_grad[0]:
            gx = grad_input_op(grad, wq, w_scale, ctx.k, ctx.grad_input_bits)
        if ctx.needs_input_grad[1]:
            a_deq = a.to(grad.dtype) if ctx.weight_only else ref.dequantized_activations(a, x_scale, grad.dtype)
            gw = (g2.t() @ a_deq.reshape(-1, ctx.k)).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None, None, None, None

    return backward


lowbit_linear.register_autograd(_linear_backward(grad_input), setup_context=_linear_setup)


# --- Inductor-visible twins (QAT graphs on CUDA with static shapes) ------------------


def linear_traced(a):
    from torch.library import wrap_triton

    if not kernel_supports(a.xq, a.wq):
        raise NotImplementedError(
            "bitnet::lowbit_linear_triton needs int8 activations and 2-bit packed weights "
            "(other configurations use bitnet::lowbit_linear)"
        )
    require_static(a.xq, "lowbit_linear_triton")
    return _linear_kernel(a, wrap=wrap_triton)


def grad_input_traced(a):
    from torch.library import wrap_triton

    require_static(a.grad, "grad_input_triton")
    return _grad_kernel(a, wrap=wrap_triton)


@functools.cache
def twin_grad_input():
    """``bitnet::grad_input_triton``: the STE input gradient's kernels from Inductor's code."""
    twin("bitnet::grad_input_triton", grad_input, grad_input_traced)
    return torch.ops.bitnet.grad_input_triton.default


@functools.cache
def twin_lowbit_linear():
    """``bitnet::lowbit_linear_triton``: the QAT linear's matmul kernel from Inductor's code; its
    STE backward uses ``grad_input_triton``, so the backward graph AOTAutograd traces launches
    the input-gradient kernels from Inductor's code as well."""
    op = twin("bitnet::lowbit_linear_triton", lowbit_linear, linear_traced)
    op.register_autograd(_linear_backward(twin_grad_input()), setup_context=_linear_setup)
    return torch.ops.bitnet.lowbit_linear_triton.default


# The warp-specialised (Gluon) exact-STE input gradient, which Inductor's code cannot launch:
# where the tuner picks it for a traced ``grad_input_triton``, the graph calls this opaque op
# (``grad [m, n] @ (unpack(wq) * w_scale)`` with launch configuration ``tile``, the kernel's
# ``TILE`` fields in order; the reference on the CPU). Defined with the low-level Library API,
# not ``custom_op``: custom_op's Python layers (its autograd fallthrough, the aliasing check of
# the result) cost ~90 µs per call on the H100's host, more than the launch itself, and this op
# runs inside backward graphs, where it needs neither.
_LIB = torch.library.Library("bitnet", "FRAGMENT")
_LIB.define(
    "grad_input_ws(Tensor grad, Tensor wq, Tensor w_scale, int k, int[] tile, ScalarType? out_dtype=None) -> Tensor"
)


def _grad_input_ws_cpu(
    grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, tile: list[int], out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    return ref.grad_input(grad, wq, w_scale, k).to(out_dtype or grad.dtype)


def _grad_input_ws_cuda(
    grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, tile: list[int], out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    from bitcompile.kernels import grad_input_ws as gluon

    if grad.dim() != 2 or tuple(wq.shape) != (grad.shape[1], (k + 3) // 4):
        raise ValueError(
            f"bitnet::grad_input_ws takes grads [m, n] and packed weights [n, (k + 3) // 4]; got "
            f"{tuple(grad.shape)}, {tuple(wq.shape)}, k={k}"
        )
    gluon.require(grad, wq, w_scale)
    out = grad.new_empty((grad.shape[0], k), dtype=out_dtype or grad.dtype)
    gluon.launch(grad, wq, w_scale, out, *tile)
    return out


_LIB.impl("grad_input_ws", _grad_input_ws_cpu, "CPU")
_LIB.impl("grad_input_ws", _grad_input_ws_cuda, "CUDA")


@torch.library.register_fake("bitnet::grad_input_ws")
def _(grad, wq, w_scale, k, tile, out_dtype=None):
    return grad.new_empty((grad.shape[0], k), dtype=out_dtype or grad.dtype)


grad_input_ws = torch.ops.bitnet.grad_input_ws
