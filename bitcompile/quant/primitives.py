"""Quantization methods and dequantization, on the backend's definitions.

Every quantizer returns a :class:`TernaryTensor` (trits + scale). When gradients
are wanted it also carries the quantizer's surrogate gradient (see
``bitcompile.quant.tensor``), so ``dequantize(q)`` is differentiable: the
straight-through estimator (identity) for the input unless a function says
otherwise. ``ternary_quantize`` is the BitNet b1.58 absmean quantizer the backend
uses (``bitcompile.numerics.reference``), so eager and compiled code agree.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from bitcompile.numerics import reference as ref
from bitcompile.quant.tensor import QuantizedTensor, ScaleLike, TernaryTensor


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def ste_carrier(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Zero-valued, identity-gradient carrier (the STE), or None when no grad is needed."""
    if not _wants_grad(x):
        return None
    xf = x.float()
    return xf - xf.detach()


def _check_float(x, name="x"):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {type(x).__name__}"
            f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}"
        )


def _readable(t: torch.Tensor) -> bool:
    # Values can be read eagerly, not from the compiler's fake tensors or on the meta device.
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def check_range(
    name: str, value, low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False
) -> None:
    """``value`` (a real number, or a tensor whose elements all are) is finite and within ``low`` ..
    ``high`` (``*_open``: that end excluded); else a ValueError naming ``name`` and the range. A
    tensor's values are read only eagerly, never while the compiler traces."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be real, got a tensor of {value.dtype}")
        if not _readable(value):
            return
        v = value.detach()
        ok = bool(
            torch.isfinite(v).all()
            and ((v > low) if low_open else (v >= low)).all()
            and ((v < high) if high_open else (v <= high)).all()
        )
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        ok = (
            v == v
            and abs(v) != float("inf")
            and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high)
        )
    else:
        ok = False
    if not ok:
        hi = "" if high == float("inf") else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} {low:g}{hi}, got {value!r}")


def check_positive(name: str, value) -> None:
    """``value`` is a finite number > 0 (see :func:`check_range`)."""
    check_range(name, value, 0.0, low_open=True)


def positive(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``|p|``, at least ``eps``: how a learnable scale or step size is used in a forward pass, so
    that an optimizer step that takes it to or through zero leaves values and gradients finite.
    The gradient is that of ``|p|`` (unchanged while ``p > eps``), also where the clamp acts."""
    a = p.abs()
    return a + (a.clamp(min=eps) - a).detach()


def ternary_quantize(x: torch.Tensor, per_channel: bool = False) -> TernaryTensor:
    """BitNet b1.58 absmean: ``s = mean|x|`` (per tensor, or per row of a 2-D ``x``
    with ``per_channel``), trits ``clip(round(x / s), -1, 1)``. STE gradient."""
    _check_float(x)
    if per_channel and x.dim() != 2:
        raise ValueError(f"per_channel needs a 2-D tensor [out, in], got shape {tuple(x.shape)}")
    xd = x.detach()
    s = ref.weight_scale(xd if x.dim() else xd.reshape(1), "ternary", per_channel)
    trits = ref.weight_integers(xd, s, "ternary")
    scale = s.reshape(-1, 1) if per_channel else s.reshape(())
    return TernaryTensor(trits, scale, grad_carrier=ste_carrier(x))


def threshold_quantize(x: torch.Tensor, threshold: float = 0.5, scale: float = 1.0) -> TernaryTensor:
    """``+1`` where ``x > threshold * scale``, ``-1`` where ``x < -threshold * scale``,
    else 0. The result has unit scale (``dequantize`` gives the trits). STE gradient.
    ``threshold`` and ``scale`` are finite and >= 0."""
    _check_float(x)
    check_range("threshold", threshold, 0.0)
    check_range("scale", scale, 0.0)
    t = threshold * scale
    trits = (x.detach() > t).to(torch.int8) - (x.detach() < -t).to(torch.int8)
    return TernaryTensor(trits, 1.0, grad_carrier=ste_carrier(x))


def sparsity_mask(x: torch.Tensor, sparsity: float, name: str = "sparsity") -> torch.Tensor:
    """Boolean mask keeping all but the ``round(sparsity * numel)`` smallest ``|x|``.

    Ranking (not a ``<=`` threshold) makes the zero count exact even with ties. ``sparsity`` must
    be in [0, 1] (a ValueError names it as ``name``)."""
    check_range(name, sparsity, 0.0, 1.0)
    flat = x.detach().abs().flatten()
    n_zero = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_zero:
        keep[torch.argsort(flat, stable=True)[:n_zero]] = False
    return keep.reshape(x.shape)


def adaptive_threshold_quantize(
    x: torch.Tensor, percentile: float = 0.7, target_sparsity: Optional[float] = None
) -> TernaryTensor:
    """Threshold at the ``percentile``-th value of ``|x|`` (so that fraction becomes 0),
    or at whatever gives ``target_sparsity`` zeros when that is given (it wins).
    Exact to the element: the ``round(p * numel)`` smallest ``|x|`` become 0 (plus
    any exact zeros of ``x``). Unit scale; STE gradient."""
    _check_float(x)
    p, name = (percentile, "percentile") if target_sparsity is None else (target_sparsity, "target_sparsity")
    keep = sparsity_mask(x, p, name)
    trits = (torch.sign(x.detach()) * keep).to(torch.int8)
    return TernaryTensor(trits, 1.0, grad_carrier=ste_carrier(x))


def stochastic_probabilities(x: torch.Tensor, temperature: float = 1.0, threshold: float = 0.5):
    """``(p_neg, p_zero, p_pos)`` with ``p_pos = sigmoid((x - t) / T)`` and
    ``p_neg = sigmoid((-x - t) / T)``; ``p_zero > 0`` whenever ``t > 0``."""
    check_positive("temperature", temperature)
    check_positive("threshold", threshold)
    xf = x.detach().float()
    p_pos = torch.sigmoid((xf - threshold) / temperature)
    p_neg = torch.sigmoid((-xf - threshold) / temperature)
    return p_neg, 1.0 - p_pos - p_neg, p_pos


def stochastic_quantize(
    x: torch.Tensor,
    temperature: float = 1.0,
    training: bool = True,
    threshold: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> TernaryTensor:
    """Sample each trit from ``{-1: p_neg, 0: p_zero, +1: p_pos}`` while ``training``;
    otherwise threshold deterministically at ``threshold`` (the temperature -> 0 limit
    of the sampling; the most probable trit would never be 0 at ``T = 1``, where
    ``p_zero < 0.25``). Unit scale; STE gradient."""
    _check_float(x)
    p_neg, p_zero, p_pos = stochastic_probabilities(x, temperature, threshold)
    if training:
        u = torch.rand(x.shape, generator=generator, device=x.device)
        trits = (u < p_pos).to(torch.int8) - (u >= 1.0 - p_neg).to(torch.int8)
    else:
        return threshold_quantize(x, threshold)
    return TernaryTensor(trits, 1.0, grad_carrier=ste_carrier(x))


def learned_quantize(
    x: torch.Tensor,
    pos_threshold: torch.Tensor,
    neg_threshold: torch.Tensor,
    pos_scale: ScaleLike = 1.0,
    neg_scale: ScaleLike = 1.0,
    temperature: float = 0.1,
) -> TernaryTensor:
    """``+1 * pos_scale`` where ``x > pos_threshold``, ``-1 * neg_scale`` where
    ``x < neg_threshold``, else 0. Thresholds and scales may be per-channel
    (broadcastable to ``x``).

    Gradients: the scales get their exact gradient (the dequantized value is linear
    in them); ``x`` gets the STE; the thresholds, which the hard forward does not
    depend on smoothly, get the gradient of the surrogate
    ``pos_scale * sigmoid((x - t_pos) / T) - neg_scale * sigmoid((t_neg - x) / T)``
    (``T = temperature``, a finite number or tensor > 0)."""
    _check_float(x)
    check_positive("temperature", temperature)
    xd = x.detach()
    trits = (xd > pos_threshold.detach()).to(torch.int8) - (xd < neg_threshold.detach()).to(torch.int8)
    carrier = ste_carrier(x)
    if _wants_grad(pos_threshold, neg_threshold):
        ps = pos_scale.detach() if isinstance(pos_scale, torch.Tensor) else pos_scale
        ns = neg_scale.detach() if isinstance(neg_scale, torch.Tensor) else neg_scale
        soft = ps * torch.sigmoid((xd - pos_threshold) / temperature) - ns * torch.sigmoid(
            (neg_threshold - xd) / temperature
        )
        carrier = (soft - soft.detach()) + (0 if carrier is None else carrier)
    return TernaryTensor(trits, pos_scale, neg_scale=neg_scale, grad_carrier=carrier)


def xnor_quantize(x: torch.Tensor, binary: bool = False) -> tuple[TernaryTensor, torch.Tensor]:
    """XNOR-Net: ``alpha = mean|x|``; trits ``sign(x)`` (``binary``: {-1, +1}, 0 maps
    to +1) or ternary ``clip(round(x / alpha), -1, 1)``. Returns ``(trits, alpha)``,
    the trits with unit scale, so a product is ``(a @ q) * alpha``. STE gradient."""
    _check_float(x)
    xd = x.detach()
    alpha = ref.weight_scale(xd.reshape(1, -1), "ternary", False).reshape(())
    trits = ref.weight_integers(xd, alpha, "binary" if binary else "ternary")
    return TernaryTensor(trits, 1.0, grad_carrier=ste_carrier(x)), alpha


def dequantize(
    x: Union[QuantizedTensor, torch.Tensor], scale: ScaleLike = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * own scale * scale`` as ``dtype`` (a plain tensor is just scaled)."""
    if isinstance(x, QuantizedTensor):
        return x.dequantize(scale, dtype)
    return (x.float() * scale).to(dtype)


def _channel_view(v: ScaleLike, like: torch.Tensor) -> ScaleLike:
    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1:
        if v.numel() != like.shape[0]:
            raise ValueError(
                f"per-channel scale/zero_point has {v.numel()} entries; dim 0 of the tensor has {like.shape[0]}"
            )
        return v.reshape(-1, *([1] * (like.dim() - 1)))
    return v


def affine_dequantize(x: QuantizedTensor, scale: ScaleLike, zero_point: ScaleLike = 0.0) -> torch.Tensor:
    """``scale * codes + zero_point``; a 1-D ``scale``/``zero_point`` is per channel
    (dim 0), a scalar or one-element tensor per tensor. The codes' own scale is not used."""
    c = x.codes.float()
    y = _channel_view(scale, c) * c + _channel_view(zero_point, c)
    return y + x.grad_carrier if x.grad_carrier is not None else y


@dataclass
class QuantizationReport:
    """What :func:`validate_quantization` reports: error of the dequantized tensor and the trit
    distribution."""

    mse: float
    mae: float
    fraction_negative: float
    fraction_zero: float
    fraction_positive: float

    def __str__(self) -> str:
        return (
            f"Quantization MSE: {self.mse:.6g}\nQuantization MAE: {self.mae:.6g}\n"
            f"Distribution: {self.fraction_negative:.2%} / {self.fraction_zero:.2%} / {self.fraction_positive:.2%}"
        )


def validate_quantization(
    original: torch.Tensor, quantized: QuantizedTensor, verbose: bool = False
) -> QuantizationReport:
    """MSE and MAE between ``original`` and ``dequantize(quantized)``, and the
    fractions of -1 / 0 / +1 codes (``verbose`` also prints them)."""
    with torch.no_grad():
        err = original.float() - quantized.dequantize()
        n = max(quantized.numel(), 1)
        report = QuantizationReport(
            mse=float((err**2).mean()),
            mae=float(err.abs().mean()),
            fraction_negative=int((quantized.codes == -1).sum()) / n,
            fraction_zero=int((quantized.codes == 0).sum()) / n,
            fraction_positive=int((quantized.codes == 1).sum()) / n,
        )
    if verbose:
        print(report)
    return report
