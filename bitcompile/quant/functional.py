"""Quantization-aware operations on the ``bitnet`` ops.

Weights follow torch's layout (``[out_features, in_features]`` as ``F.linear``,
not the transposed ``[in, out]``). Weights are quantized with the
backend's BitNet absmean ternary quantizer, activations with its per-token
absmax int8 quantizer, and gradients are the straight-through estimator, so
``quantized_linear(x, w, b, True, True)`` is exactly what the compiled path runs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitnet)
from bitcompile.numerics import reference as ref
from bitcompile.quant.gradients import ste_quantize, straight_through
from bitcompile.quant.quantizers import fake_quantize
from bitcompile.quant.tensor import TernaryTensor

IntPair = Union[int, tuple[int, int]]


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax ``bits``-bit activations, dequantized, with the STE."""
    q, s = torch.ops.bitnet.quantize_activations(x, bits)
    return straight_through(x, ref.dequantized_activations(q, s, x.dtype))


def _ternary_operands(t: TernaryTensor, n: int):
    """(packed, float32 scale [1] or [N]) if ``t`` fits the bitnet ops, else None."""
    if t.dim() != 2 or t.neg_scale is not None or t.zero_point is not None:
        return None
    s = t.scale.detach().float().reshape(-1)
    if s.numel() not in (1, n):
        return None
    return t.pack(), s


def quantized_linear(
    input: torch.Tensor,
    weight: Union[torch.Tensor, TernaryTensor],
    bias: Optional[torch.Tensor] = None,
    quantize_weights: bool = True,
    quantize_activations: bool = False,
    activation_bits: int = 8,
) -> torch.Tensor:
    """``input @ weight^T + bias`` with ternary weights and/or int8 activations.

    ``weight`` is ``[out, in]`` float (quantized here when ``quantize_weights``) or a
    pre-quantized :class:`TernaryTensor` (used as is). Gradients: STE. A weight with no rows or
    no columns has nothing to quantize: the result is ``F.linear``'s (empty, or ``bias``)."""
    if 0 in weight.shape:
        w = weight.dequantize(dtype=input.dtype) if isinstance(weight, TernaryTensor) else weight
        return F.linear(input, w, bias)
    xq = x_scale = None
    if quantize_activations:
        xq, x_scale = torch.ops.bitnet.quantize_activations(input, activation_bits)
    if isinstance(weight, TernaryTensor):
        operands = _ternary_operands(weight, weight.shape[0])
        latent = weight.dequantize(dtype=input.dtype)
        if operands is None:  # asymmetric or odd-shaped scales: float matmul on the values
            x = fake_quantize_activations(input, activation_bits) if quantize_activations else input
            return F.linear(x, latent, bias)
        wq, w_scale = operands
        return torch.ops.bitnet.lowbit_linear(input, latent, bias, xq, x_scale, wq, w_scale)
    if quantize_weights:
        wq, w_scale = torch.ops.bitnet.quantize_weights(weight, "ternary", False)
        return torch.ops.bitnet.lowbit_linear(input, weight, bias, xq, x_scale, wq, w_scale)
    x = (
        straight_through(input, ref.dequantized_activations(xq, x_scale, input.dtype))
        if quantize_activations
        else input
    )
    return F.linear(x, weight, bias)


def _fake_quantize_channels(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Each pixel's channel vector is a "token" (channels last for the per-token op).
    return fake_quantize_activations(x.movedim(1, -1), bits).movedim(-1, 1)


def quantized_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    quantize_weights: bool = True,
    quantize_activations: bool = False,
    activation_bits: int = 8,
) -> torch.Tensor:
    """``F.conv2d`` on ternary (absmean, per tensor) weights and/or per-pixel absmax
    ``activation_bits``-bit activations, with STE gradients."""
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"quantized_conv2d needs input [B, C, H, W] and weight [O, C, kh, kw]; "
            f"got {tuple(input.shape)}, {tuple(weight.shape)}"
        )
    w = ste_quantize(weight) if quantize_weights else weight
    x = _fake_quantize_channels(input, activation_bits) if quantize_activations else input
    return F.conv2d(x, w, bias, stride=stride, padding=padding)


def quantized_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    quantize_a: bool = False,
    quantize_b: bool = True,
    use_ste: bool = True,
    activation_bits: int = 8,
) -> torch.Tensor:
    """``a [..., k] @ b [k, n]`` with ``b`` ternary (absmean, per tensor) and/or ``a``
    per-row absmax int8. With both quantized the product is the exact integer
    accumulator, rescaled. ``use_ste=False`` gives the quantized operands their true
    (zero) gradient instead of the straight-through one (with both quantized, the
    result then does not require grad)."""
    if b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"quantized_matmul needs a [..., k] and b [k, n]; got {tuple(a.shape)}, {tuple(b.shape)}")
    a_in = a if (use_ste or not quantize_a) else a.detach()
    b_in = b if (use_ste or not quantize_b) else b.detach()
    if b.numel() == 0:  # k == 0 or n == 0: nothing to quantize, the product is empty or zeros
        return a_in @ b_in
    if quantize_b:
        xq = x_scale = None
        if quantize_a:
            xq, x_scale = torch.ops.bitnet.quantize_activations(a, activation_bits)
        wq, w_scale = torch.ops.bitnet.quantize_weights(b.t(), "ternary", False)
        return torch.ops.bitnet.lowbit_linear(a_in, b_in.t(), None, xq, x_scale, wq, w_scale)
    if quantize_a:
        q, s = torch.ops.bitnet.quantize_activations(a, activation_bits)
        a_in = (
            straight_through(a_in, ref.dequantized_activations(q, s, a.dtype))
            if use_ste
            else ref.dequantized_activations(q, s, a.dtype)
        )
    return a_in @ b_in


def quantized_linear_with(
    quantizer, x, weight, bias=None, activation_bits: Optional[int] = 8, layer: Optional[str] = None
) -> torch.Tensor:
    """What a compiled linear computes with a custom weight quantizer (``options={"weight":
    quantizer}``): ``linear(fake-quantized x, quantizer's fake-quantized weight, bias)``."""
    w = fake_quantize(quantizer, weight, layer)
    if activation_bits is not None:
        x = fake_quantize_activations(x, activation_bits)
    return F.linear(x, w, bias)
