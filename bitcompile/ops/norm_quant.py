"""``norm_quant``: (residual add +) normalization + per-token activation quantization in one op.

Emitted by ``passes/norm_quant.py`` in inference and QAT graphs. It reads ``x`` once and
writes the int8 codes and scales; the normalized tensor ``y`` and the sum ``h = x + residual``
are written only when asked (``store_normed`` / ``store_sum``), else returned empty. In QAT
its autograd rule backpropagates the gradient reaching ``y`` (through the linears' STE) and
``h`` through the norm and the residual add (``reference.normalize_backward``: plain torch
that AOTAutograd traces into the backward graph, where Inductor fuses it).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from bitcompile.numerics import reference as ref
from bitcompile.ops.common import bitnet_op, twin


@bitnet_op("bitnet::norm_quant")
def norm_quant(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    kind: str,
    eps: float,
    bits: int,
    norm_dtype: torch.dtype,
    store_normed: bool,
    store_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h = x (+ residual)``, ``y = norm(h)`` (``kind``: rms | rms_fp32 | layer | none), then
    per-token quantization of ``y``. Returns ``(q, scale, y, h)``, ``y`` and ``h`` empty unless
    stored."""
    q, s, y, h = ref.norm_quant(x, residual, weight, bias, kind, eps, bits, norm_dtype)
    # Outputs may not alias inputs or each other: fresh tensors where stored, contiguous whatever
    # x's layout (as the fake and the kernel write them).
    y = y.clone(memory_format=torch.contiguous_format) if store_normed else x.new_empty((0,), dtype=norm_dtype)
    return q, s, y, h.clone(memory_format=torch.contiguous_format) if store_sum else x.new_empty((0,))


def _unstored_empty(a, q, s, y, h):
    y = y if a.store_normed else a.x.new_empty((0,), dtype=a.norm_dtype)
    return q, s, y, h if a.store_sum else a.x.new_empty((0,))


@norm_quant.register_fake
def _(*args):
    a = norm_quant.Args(*args)
    x = a.x
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
        x.new_empty(x.shape if a.store_normed else (0,), dtype=a.norm_dtype),
        x.new_empty(x.shape if a.store_sum else (0,)),
    )


def kernel_supports(x: Tensor) -> bool:
    """The fused kernel holds one floating row of up to ``MAX_ROW`` elements per program."""
    from bitcompile.kernels.act_quant import MAX_ROW

    return x.dtype.is_floating_point and x.shape[-1] <= MAX_ROW


def _fused(a, wrap=None):
    from bitcompile.kernels.act_quant import norm_quant as kernel

    q, s, y, h = kernel(
        a.x, a.bits, a.kind, a.weight, a.bias, a.eps, a.residual, a.norm_dtype, a.store_normed, a.store_sum, wrap=wrap
    )
    return _unstored_empty(a, q, s, y, h)


@norm_quant.register_kernel("cuda")
def _(*args):
    a = norm_quant.Args(*args)
    if not kernel_supports(a.x):
        return norm_quant.prototype(*a)
    return _fused(a)


def _setup(ctx, inputs, output):
    a = norm_quant.Args(*inputs)
    ctx.norm = (a.kind, a.eps)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (a.x, a.residual, a.weight, a.bias))
    ctx.mark_non_differentiable(output[0], output[1])  # int8 codes and scales: the STE is the linears'
    # The norm's backward recomputes its statistics from the input (x and residual, not the
    # normalized tensor): one read, as Inductor's own norm backward does.
    ctx.save_for_backward(a.x, a.residual, a.weight, a.bias)


def _backward(ctx, _gq, _gs, gy, gh):
    x, residual, weight, bias = ctx.saved_tensors
    kind, eps = ctx.norm
    h = x if residual is None else x + residual
    g_h = gw = gb = None
    if gy is not None and gy.numel():
        g_h, gw, gb = ref.normalize_backward(h, gy, kind, weight, bias, eps)
    if gh is not None and gh.numel():
        g_h = gh.float() if g_h is None else g_h + gh.float()
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    gx = g_h.to(x_dtype) if g_h is not None else None
    gr = g_h.to(r_dtype) if g_h is not None and residual is not None else None
    gw = gw.to(w_dtype) if gw is not None else None
    gb = gb.to(b_dtype) if gb is not None else None
    return gx, gr, gw, gb, None, None, None, None, None, None


norm_quant.register_autograd(_backward, setup_context=_setup)


def traced(a):
    from torch.library import wrap_triton

    return _fused(a, wrap=wrap_triton)


@functools.cache
def twin_norm_quant():
    """``bitnet::norm_quant_triton``: the kernel launched from Inductor's code in CUDA graphs with
    static shapes (only where ``kernel_supports``); with the "none" norm it also stands for a
    plain ``quantize_activations``."""
    op = twin("bitnet::norm_quant_triton", norm_quant, traced)
    op.register_autograd(_backward, setup_context=_setup)
    return torch.ops.bitnet.norm_quant_triton.default


@bitnet_op("bitnet::gated_quant")
def gated_quant(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x = [gate | up]`` (a fused gate+up projection's output, ``[..., 2K]``): per-token
    quantization of ``silu(gate) * up`` (``reference.gated_quantize``), ``(int8 [..., K], float32
    [..., 1])``, without writing the product. Inference graphs only (no gradient)."""
    return ref.gated_quantize(x, bits)


@gated_quant.register_fake
def _(x, bits):
    k = x.shape[-1] // 2
    return x.new_empty((*x.shape[:-1], k), dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def gated_kernel_supports(x: Tensor) -> bool:
    """The kernel's row is one half of ``x`` (the product), at most ``MAX_ROW`` wide."""
    from bitcompile.kernels.act_quant import MAX_ROW

    return x.dtype.is_floating_point and x.shape[-1] % 2 == 0 and x.shape[-1] // 2 <= MAX_ROW


def _gated(x, bits, wrap=None):
    from bitcompile.kernels.act_quant import norm_quant as kernel

    q, s, _, _ = kernel(x, bits, gated=True, wrap=wrap)
    return q, s


@gated_quant.register_kernel("cuda")
def _(x, bits):
    if not gated_kernel_supports(x):
        return gated_quant.prototype(x, bits)
    return _gated(x, bits)


def gated_traced(a):
    from torch.library import wrap_triton

    return _gated(a.x, a.bits, wrap=wrap_triton)


@functools.cache
def twin_gated_quant():
    """``bitnet::gated_quant_triton``: the gated quantization launched from Inductor's code (static
    CUDA graphs without CUDA-graph replay, where ``gated_kernel_supports``)."""
    twin("bitnet::gated_quant_triton", gated_quant, gated_traced)
    return torch.ops.bitnet.gated_quant_triton.default
