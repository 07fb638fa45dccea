"""Custom quantization schemes, as weight-quantizer objects (``bitcompile.quant.WeightQuantizer``).

Logarithmic (powers of two), LSQ (learned step size with its gradient scaling),
soft differentiable (learnable-scale tanh), block-wise mixed precision and
outlier-aware quantization. Each works eagerly and as the backend's weight
quantizer (``options={"weight": quantizer}``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bitcompile.numerics.spec import check_bits, check_int
from bitcompile.quant.primitives import check_positive, check_range, positive, sparsity_mask, ste_carrier
from bitcompile.quant.quantizers import BaseQuantizer
from bitcompile.quant.tensor import QuantizedTensor, TernaryTensor


class LogQuantizer(BaseQuantizer):
    """Powers of two: levels ``0, ±m * 2^-k`` for ``k = 0 .. L-1`` with
    ``L = 2^(bits-1) - 1`` and ``m = max|x|``; rounding in the log2 domain. Code ``c``
    stores ``sign * (L - k)``. STE gradient."""

    def __init__(self, bits: int = 4):
        super().__init__()
        check_bits("bits", bits)
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        xd = x.detach().float()
        # A zero appended: max|x| of an empty tensor is 0 (then clamped), not an error.
        m = torch.cat([xd.abs().flatten(), xd.new_zeros(1)]).amax().clamp(min=1e-8)
        k = torch.round(-torch.log2((xd.abs() / m).clamp(min=1e-30)))
        mag = torch.where(k < self.levels, self.levels - k, torch.zeros_like(k))
        codes = (torch.sign(xd) * mag).to(torch.int8)
        return QuantizedTensor(codes, m, grad_carrier=ste_carrier(x))

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        c = x.codes.float()
        mag = torch.where(c != 0, torch.exp2(c.abs() - self.levels), torch.zeros_like(c))
        y = torch.sign(c) * mag * x.scale
        return y + x.grad_carrier if x.grad_carrier is not None else y


def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    # Value s, gradient g * ds (LSQ's step-size gradient scaling).
    return (s - s * g).detach() + s * g


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return (v.round() - v).detach() + v


class LSQQuantizer(BaseQuantizer):
    """Learned Step Size Quantization (Esser et al., 2020): signed ``bits``-bit codes
    ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, value ``codes * s``. The step
    ``s`` is a parameter (one, or one per output channel) whose gradient is scaled by
    ``g = 1 / sqrt(numel * Q_p)``; ``x`` gets the STE inside the clipping range, 0 outside.

    ``step`` (finite, > 0) defaults to LSQ's initialization ``2 mean|x| / sqrt(Q_p)`` when built
    with :meth:`from_tensor`. The forward uses ``|step|`` (at least 1e-8), so a step an optimizer
    takes to or through zero keeps values and gradients finite."""

    def __init__(self, bits: int = 4, step: float = 0.1, channels: Optional[int] = None):
        super().__init__()
        check_bits("bits", bits)
        check_positive("step", step)
        if channels is not None:  # None: one step for the whole tensor
            check_int("channels", channels, 0)
        self.bits = bits
        self.qn, self.qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.full((channels, 1) if channels is not None else (), float(step)))

    @classmethod
    def from_tensor(cls, w: torch.Tensor, bits: int = 4, per_channel: bool = False) -> "LSQQuantizer":
        if per_channel and w.dim() < 2:
            raise ValueError(f"per_channel needs a weight of at least 2 dims [out, ...], got shape {tuple(w.shape)}")
        q = cls(bits, channels=w.shape[0] if per_channel else None)
        if w.numel() == 0:  # nothing to initialize from: keep the default step
            return q
        a = w.detach().abs().float()
        init = (
            (a.mean(dim=tuple(range(1, a.dim())), keepdim=True).reshape(-1, 1) if per_channel else a.mean())
            * 2
            / math.sqrt(q.qp)
        )
        with torch.no_grad():
            q.step.copy_(init.clamp(min=1e-8))
        return q

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        g = 1.0 / math.sqrt(max(x.numel(), 1) * self.qp)
        step = positive(self.step)
        s = _grad_scale(step, g)
        v = torch.clamp(x.float() / s, -self.qn, self.qp)
        codes = v.detach().round().to(torch.int8)
        fq = _round_ste(v) * s
        carrier = fq - fq.detach() if torch.is_grad_enabled() and fq.requires_grad else None
        return QuantizedTensor(codes, step.detach(), grad_carrier=carrier)

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        return x.dequantize()


class SoftQuantizer(BaseQuantizer):
    """Soft differentiable ternary quantization with a learnable scale ``s``:
    ``s * tanh(x / (s * T))``. ``hard=True`` (default) uses the ternary levels
    ``s * round(tanh(...))`` in the forward and the tanh gradient in the backward;
    ``hard=False`` keeps the soft value (``fake_quantize`` then is not on the grid).
    ``temperature`` and the initial ``scale`` are finite and > 0; the forward uses ``|s|`` (at
    least 1e-8), so a scale trained to or through zero keeps values and gradients finite."""

    def __init__(self, temperature: float = 0.5, scale: float = 1.0, hard: bool = True):
        super().__init__()
        check_positive("temperature", temperature)
        check_positive("scale", scale)
        self.temperature = temperature
        self.hard = hard
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.float() / (positive(self.scale) * self.temperature))

    def quantize(self, x: torch.Tensor) -> TernaryTensor:
        soft = self._soft(x)
        codes = soft.detach().round().to(torch.int8)
        carrier = None
        if torch.is_grad_enabled() and soft.requires_grad:
            carrier = positive(self.scale).detach() * (soft - soft.detach())
        return TernaryTensor(codes, positive(self.scale), grad_carrier=carrier)

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        return x.dequantize()

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return self.dequantize(self.quantize(x))
        return positive(self.scale) * self._soft(x)


def _absmax_codes(block: torch.Tensor, bits: int):
    """Symmetric absmax per row of ``block [..., B]``: (codes, scale [..., 1]); bits=2 is ternary absmean."""
    a = block.abs()
    if bits == 2:
        s = a.mean(dim=-1, keepdim=True).clamp(min=1e-8)
        return (block / s).round().clamp(-1, 1), s
    qmax = 2 ** (bits - 1) - 1
    s = a.amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (block / s).round().clamp(-qmax, qmax), s


class BlockwiseMixedPrecisionQuantizer(BaseQuantizer):
    """Split each row's last dim into blocks of ``block_size``; the
    ``high_precision_fraction`` of blocks with the largest ``max|x| / mean|x|``
    (the ones ternary rounding hurts most) get ``high_bits`` absmax codes, the rest
    ``low_bits`` (2 = ternary absmean). ``last_bits`` holds each block's choice."""

    def __init__(
        self, block_size: int = 64, low_bits: int = 2, high_bits: int = 8, high_precision_fraction: float = 0.25
    ):
        super().__init__()
        check_bits("low_bits", low_bits)
        check_bits("high_bits", high_bits)
        check_int("block_size", block_size, 1)
        check_range("high_precision_fraction", high_precision_fraction, 0.0, 1.0)
        self.block_size, self.low_bits, self.high_bits, self.fraction = (
            block_size,
            low_bits,
            high_bits,
            high_precision_fraction,
        )
        self.last_bits: Optional[torch.Tensor] = None

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        xd = x.detach().float()
        k = xd.shape[-1]
        pad = (-k) % self.block_size
        n_blocks = (k + pad) // self.block_size  # explicit: -1 cannot be inferred for an empty tensor
        blocks = torch.nn.functional.pad(xd, (0, pad)).reshape(*xd.shape[:-1], n_blocks, self.block_size)
        a = blocks.abs()
        ratio = a.amax(-1) / a.mean(-1).clamp(min=1e-12)
        n_high = int(round(self.fraction * ratio.numel()))
        high = torch.zeros(ratio.numel(), dtype=torch.bool, device=x.device)
        if n_high:
            high[ratio.flatten().topk(n_high).indices] = True
        high = high.reshape(ratio.shape).unsqueeze(-1)
        lo_codes, lo_s = _absmax_codes(blocks, self.low_bits)
        hi_codes, hi_s = _absmax_codes(blocks, self.high_bits)
        codes = torch.where(high, hi_codes, lo_codes)
        scale = torch.where(high, hi_s, lo_s).expand_as(blocks)
        unblock = lambda t: t.flatten(-2)[..., :k]  # noqa: E731
        if type(xd) is torch.Tensor:  # a real tensor, not one being traced by the compiler
            self.last_bits = torch.where(high.squeeze(-1), self.high_bits, self.low_bits)
        return QuantizedTensor(unblock(codes).to(torch.int8), unblock(scale), grad_carrier=ste_carrier(x))

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        return x.dequantize()


class OutlierTensor(TernaryTensor):
    """Ternary inliers plus a few full-precision outliers kept at their positions."""

    def __init__(self, trits, scale, outlier_mask: torch.Tensor, outliers: torch.Tensor, **kwargs):
        super().__init__(trits, scale, **kwargs)
        # Dense (zeros off the mask) rather than gathered values: static shapes trace.
        self.outlier_mask, self.outliers = outlier_mask, outliers

    def dequantize(self, scale=1.0, dtype=torch.float32) -> torch.Tensor:
        y = super().dequantize(scale, torch.float32)
        kept = self.outliers.float() * scale
        if self.grad_carrier is not None:
            kept = kept + self.grad_carrier  # the STE holds at the outliers too
        return torch.where(self.outlier_mask, kept, y).to(dtype)


class OutlierAwareQuantizer(BaseQuantizer):
    """Keep the ``outlier_fraction`` largest ``|x|`` in full precision; ternary
    (absmean over the inliers only, so outliers do not inflate the scale) elsewhere."""

    def __init__(self, outlier_fraction: float = 0.01):
        super().__init__()
        check_range("outlier_fraction", outlier_fraction, 0.0, 1.0, high_open=True)
        self.outlier_fraction = outlier_fraction

    def quantize(self, x: torch.Tensor) -> OutlierTensor:
        xd = x.detach().float()
        inlier = ~sparsity_mask(xd, 1.0 - self.outlier_fraction)  # keeps the largest fraction
        s = (xd.abs() * inlier).sum() / inlier.sum().clamp(min=1)
        s = s.clamp(min=1e-8)
        trits = ((xd / s).round().clamp(-1, 1) * inlier).to(torch.int8)
        return OutlierTensor(trits, s, ~inlier, torch.where(inlier, 0.0, xd), grad_carrier=ste_carrier(x))

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        return x.dequantize()
