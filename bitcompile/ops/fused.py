"""Fused ``bitnet`` ops emitted by the fusion passes.

``norm_quant``: (residual add +) normalization + per-token activation quantization in one
op (``bitcompile/passes/norm_quant.py``; inference and QAT, with the norm's backward as its autograd
rule). ``linear_q``: an inference linear from already-quantized activations with the
activation / residual epilogue (``bitcompile/passes/epilogue.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.ops import reference as ref


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


def norm_quant_setup(ctx, inputs, output):
    x, residual, weight, bias, kind, eps, bits, norm_dtype, store_normed, store_sum = inputs
    ctx.norm = (kind, eps)
    ctx.has = (residual is not None, weight is not None, bias is not None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, residual, weight, bias))
    ctx.mark_non_differentiable(output[0], output[1])  # int8 codes and scales: the STE is lowbit_linear's
    # The norm's backward recomputes its statistics from the input (x and residual, not the
    # normalized tensor): one read, as Inductor's own norm backward does.
    ctx.save_for_backward(x, residual, weight, bias)


def norm_quant_backward(ctx, _gq, _gs, gy, gh):
    """QAT: the gradient reaching the stored normalized output (through the linears' STE)
    and the stored sum flows back through the norm and the residual add."""
    x, residual, weight, bias = ctx.saved_tensors
    kind, eps = ctx.norm
    h = x if residual is None else x + residual
    g_h = None
    gw = gb = None
    if gy is not None and gy.numel():
        g_h, gw, gb = ref.normalize_backward(h, gy, kind, weight, bias, eps)
    if gh is not None and gh.numel():
        g_h = gh.float() if g_h is None else g_h + gh.float()
    gx = g_h.to(ctx.dtypes[0]) if g_h is not None else None
    gr = g_h.to(ctx.dtypes[1]) if g_h is not None and residual is not None else None
    gw = gw.to(ctx.dtypes[2]) if gw is not None else None
    gb = gb.to(ctx.dtypes[3]) if gb is not None else None
    return gx, gr, gw, gb, None, None, None, None, None, None


norm_quant.register_autograd(norm_quant_backward, setup_context=norm_quant_setup)


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
