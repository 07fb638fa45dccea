"""Inductor-visible twins of the inference ops, as ``torch.library.triton_op``s.

``linear_q`` and ``norm_quant`` are opaque custom ops: Inductor calls them as extern
kernels, and every call pays the Python dispatcher and Triton's launcher on the host
(about 130 µs on the H100 machine, BENCHMARKS.md), which dominates decode-sized
layers unless CUDA graphs hide it. Their ``*_triton`` twins here launch the same
kernels through ``wrap_triton``: AOTAutograd decomposes them into the kernel calls, and
Inductor compiles and launches those from its generated code like its own kernels.

``passes.lower_triton`` swaps them in for CUDA inference graphs with static shapes (a
kernel variant and its tuned launch configuration are chosen per row count at compile
time). ``linear_q_triton`` takes its packed weights in the K-blocked kernel layout
(``bitcompile.quant.packing.to_kblocked``), relaid once by the weight cache. On the CPU
both fall back to the reference (``register_kernel("cpu")``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from bitcompile.ops import reference as ref
from bitcompile.quant.packing import from_kblocked


def linear_q_kblocked(
    xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int, dtype: torch.dtype,
    activation: str, residual: Optional[Tensor],
) -> Tensor:
    """``linear_q`` on K-blocked packed weights, through the Triton kernels."""
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    if not all(isinstance(d, int) for d in xq.shape):
        raise NotImplementedError("bitnet::linear_q_triton needs static shapes (its kernel variant depends on the "
                                  "row count); with symbolic shapes use bitnet::linear_q")
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


linear_q_triton = triton_op("bitnet::linear_q_triton", mutates_args=())(linear_q_kblocked)
norm_quant_triton = triton_op("bitnet::norm_quant_triton", mutates_args=())(norm_quant_fused)


@linear_q_triton.register_kernel("cpu")
def _(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual):
    return ref.linear_epilogue(xq, x_scale, from_kblocked(wq, k), w_scale, bias, k, dtype, activation, residual)


@norm_quant_triton.register_kernel("cpu")
def _(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed, store_sum):
    return torch.ops.bitnet.norm_quant(x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed,
                                       store_sum)
