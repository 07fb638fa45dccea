"""Inductor-visible twins of the bitnet ops, as ``torch.library.triton_op``s.

The ops of ``library`` and ``fused`` are opaque custom ops: Inductor calls them as extern
kernels, and every call pays the Python dispatcher and Triton's launcher on the host
(about 130 µs on the H100 machine, BENCHMARKS.md), which dominates decode-sized
layers unless CUDA graphs hide it. Their ``*_triton`` twins here launch the same
kernels through ``wrap_triton``: AOTAutograd decomposes them into the kernel calls, and
Inductor compiles and launches those from its generated code like its own kernels.

Inference: ``linear_q_triton`` and ``norm_quant_triton``. ``linear_q_triton`` takes its
packed weights in the K-blocked kernel layout (``bitcompile.quant.packing.to_kblocked``),
relaid once by the weight cache. QAT: ``quantize_weights_triton``, ``lowbit_linear_triton``
and ``norm_quant_triton`` carry their originals' autograd rules, and the STE backward of
``lowbit_linear_triton`` computes the input gradient with ``grad_input_triton``, so the
backward graph launches the kernels from Inductor's code too.

One kernel cannot be launched that way: the Gluon (warp-specialised) exact-STE input gradient,
which Inductor's code cannot launch. Where the tuner picks it for a traced
``grad_input_triton``, the graph calls the opaque op ``grad_input_ws`` instead (one extern
call per backward, its host cost ~ a launch's).

``passes.lower_triton`` swaps them in for CUDA graphs with static shapes (a kernel variant
and its tuned launch configuration are chosen per row count at compile time). On the CPU
they fall back to the reference (``register_kernel("cpu")``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from bitcompile.kernels import grad_input_ws as gluon_grad_input
from bitcompile.ops import reference as ref
from bitcompile.ops.fused import norm_quant_backward, norm_quant_setup
from bitcompile.ops.library import linear_backward, linear_setup, no_gradient, quantizer_setup
from bitcompile.quant.packing import from_kblocked


def _require_static(t: Tensor, op: str) -> None:
    if not all(isinstance(d, int) for d in t.shape):
        raise NotImplementedError(f"bitnet::{op} needs static shapes (its kernel variant depends on the row count); "
                                  f"with symbolic shapes use the opaque op")


def linear_q_kblocked(
    xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int, dtype: torch.dtype,
    activation: str, residual: Optional[Tensor],
) -> Tensor:
    """``linear_q`` on K-blocked packed weights, through the Triton kernels."""
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    _require_static(xq, "linear_q_triton")
    return ternary_matmul(xq, wq, k, x_scale, w_scale, bias, dtype, activation, residual, layout="kblocked",
                          wrap=wrap_triton)


def norm_quant_fused(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], kind: str, eps: float,
    bits: int, norm_dtype: torch.dtype, store_normed: bool, store_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``norm_quant`` through the Triton kernel; unstored outputs are empty, as there."""
    from bitcompile.kernels.act_quant import norm_quant as kernel

    q, s, y, h = kernel(x, bits, kind, weight, bias, eps, residual, norm_dtype, store_normed, store_sum,
                        wrap=wrap_triton)
    y = y if store_normed else x.new_empty((0,), dtype=norm_dtype)
    return q, s, y, h if store_sum else x.new_empty((0,))


def quantize_weights_packed(w: Tensor, scheme: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """``quantize_weights`` of a 2-D float weight (a scheme of ``kernels.weight_pack``)
    through the weight-pack kernels: canonical packed bytes and the scale."""
    from bitcompile.kernels.weight_pack import quantize_pack

    return quantize_pack(w, scheme, per_channel, wrap=wrap_triton)


def lowbit_linear_packed(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: Optional[Tensor], x_scale: Optional[Tensor], wq: Tensor,
    w_scale: Tensor, grad_input_bits: Optional[int] = None,
) -> Tensor:
    """QAT ``lowbit_linear`` on int8 activations and canonical packed ternary weights
    (re-packed every step, so relaid per call) through the matmul kernel."""
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if xq is None or x_scale is None:
        raise NotImplementedError("bitnet::lowbit_linear_triton needs quantized activations (weight-only "
                                  "quantization uses bitnet::lowbit_linear)")
    _require_static(xq, "lowbit_linear_triton")
    return ternary_matmul(xq, wq, x.shape[-1], x_scale, w_scale, bias, x.dtype, wrap=wrap_triton, keep=False)


def grad_input_packed(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, bits: Optional[int] = None) -> Tensor:
    """``grad_input`` (the STE input gradient) through the Triton kernels."""
    from bitcompile.kernels.grad_input import grad_input, grad_input_quantized

    _require_static(grad, "grad_input_triton")
    if bits is not None:
        return grad_input_quantized(grad, wq, w_scale, k, bits, wrap=wrap_triton)
    return grad_input(grad, wq, w_scale, k, wrap=wrap_triton, gluon_op=grad_input_ws)


# Defined with the low-level Library API, not ``custom_op``: custom_op's Python layers (its
# autograd fallthrough, the aliasing check of the result) cost ~90 µs per call on the H100's
# host, more than the launch itself (round 20), and this op is called inside backward graphs,
# where it needs neither.
_LIB = torch.library.Library("bitnet", "FRAGMENT")
_LIB.define("grad_input_ws(Tensor grad, Tensor wq, Tensor w_scale, int k, int[] tile) -> Tensor")


def _grad_input_ws_cpu(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, tile: list[int]) -> Tensor:
    return ref.grad_input(grad, wq, w_scale, k)


def _grad_input_ws_cuda(grad: Tensor, wq: Tensor, w_scale: Tensor, k: int, tile: list[int]) -> Tensor:
    if grad.dim() != 2 or tuple(wq.shape) != (grad.shape[1], (k + 3) // 4):
        raise ValueError(f"bitnet::grad_input_ws takes grads [m, n] and packed weights [n, (k + 3) // 4]; got "
                         f"{tuple(grad.shape)}, {tuple(wq.shape)}, k={k}")
    gluon_grad_input.require(grad, wq, w_scale)
    out = grad.new_empty((grad.shape[0], k))
    gluon_grad_input.launch(grad, wq, w_scale, out, *tile)
    return out


_LIB.impl("grad_input_ws", _grad_input_ws_cpu, "CPU")
_LIB.impl("grad_input_ws", _grad_input_ws_cuda, "CUDA")


@torch.library.register_fake("bitnet::grad_input_ws")
def _(grad, wq, w_scale, k, tile):
    return grad.new_empty((grad.shape[0], k))


# ``grad [m, n] @ (unpack(wq) * w_scale)`` by ``kernels.grad_input_ws`` with launch configuration
# ``tile`` (its ``TILE`` fields, in order); the reference on the CPU.
grad_input_ws = torch.ops.bitnet.grad_input_ws


linear_q_triton = triton_op("bitnet::linear_q_triton", mutates_args=())(linear_q_kblocked)
norm_quant_triton = triton_op("bitnet::norm_quant_triton", mutates_args=())(norm_quant_fused)
quantize_weights_triton = triton_op("bitnet::quantize_weights_triton", mutates_args=())(quantize_weights_packed)
lowbit_linear_triton = triton_op("bitnet::lowbit_linear_triton", mutates_args=())(lowbit_linear_packed)
grad_input_triton = triton_op("bitnet::grad_input_triton", mutates_args=())(grad_input_packed)

# QAT: the originals' autograd rules (the backward graph AOTAutograd traces from them then
# holds the twins' kernels as well).
norm_quant_triton.register_autograd(norm_quant_backward, setup_context=norm_quant_setup)
quantize_weights_triton.register_autograd(no_gradient, setup_context=quantizer_setup)
lowbit_linear_triton.register_autograd(linear_backward(grad_input_triton), setup_context=linear_setup)


@linear_q_triton.register_kernel("cpu")
def _(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual):
    return ref.linear_epilogue(xq, x_scale, from_kblocked(wq, k), w_scale, bias, k, dtype, activation, residual)


@norm_quant_triton.register_kernel("cpu")
def _(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed, store_sum):
    return torch.ops.bitnet.norm_quant(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed,
                                       store_sum)


@quantize_weights_triton.register_kernel("cpu")
def _(w, scheme, per_channel):
    return ref.quantize_weights(w, scheme, per_channel)


@lowbit_linear_triton.register_kernel("cpu")
def _(x, weight, bias, xq, x_scale, wq, w_scale, grad_input_bits=None):
    return ref.lowbit_linear(x, bias, xq, x_scale, wq, w_scale, x.shape[-1])


@grad_input_triton.register_kernel("cpu")
def _(grad, wq, w_scale, k, bits=None):
    return ref.grad_input(grad, wq, w_scale, k, bits)
