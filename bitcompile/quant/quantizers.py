"""The weight-quantizer protocol (``WeightQuantizer``) and example quantizers.

A quantizer is any object with ``quantize(x)``, ``dequantize(q)`` and
``parameters()``. ``dequantize(quantize(w))`` is its *fake-quantized* weight: the
quantized value in the forward and the quantizer's own gradient rule in the
backward (carried by the returned tensor, see ``bitcompile.quant.tensor``). That
is all the backend needs to use it: ``torch.compile(model, backend="bitnet",
options={"weight": quantizer})``; its learnable parameters then get gradients
through the compiled graph like any model parameter.

Per-layer quantizers (``LayerAdaptiveQuantizer``, ``MixedPrecisionQuantizer``)
take a layer index, or a module path when built with ``layers=[...]``; the
backend passes each linear's module path.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

from bitcompile.config import BitConfig, check_quantizer
from bitcompile.numerics.spec import check_int
from bitcompile.quant.primitives import (
    check_positive,
    check_range,
    learned_quantize,
    positive,
    ste_carrier,
    ternary_quantize,
)
from bitcompile.quant.tensor import QuantizedTensor, TernaryTensor

Layer = Union[int, str]


@runtime_checkable
class WeightQuantizer(Protocol):
    """What a weight quantizer object provides: ``quantize`` (float -> quantized tensor),
    ``dequantize`` (back to float) and ``parameters`` (its learnable tensors). The backend takes
    one as ``options={"weight": quantizer}``. (``bitcompile.Quantizer`` is something else: it
    swaps a model's linear layers.)"""

    def quantize(self, x: torch.Tensor) -> QuantizedTensor: ...

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor: ...

    def parameters(self): ...


def _takes_layer(method) -> bool:
    return len(inspect.signature(method).parameters) >= 2


def fake_quantize(quantizer, w: torch.Tensor, layer: Optional[Layer] = None) -> torch.Tensor:
    """``quantizer.dequantize(quantizer.quantize(w))`` in ``w``'s dtype, passing
    ``layer`` to per-layer quantizers; a quantizer may define ``fake_quantize`` itself."""
    own = getattr(quantizer, "fake_quantize", None)
    if own is not None:
        out = own(w, layer) if _takes_layer(own) else own(w)
    elif _takes_layer(quantizer.quantize):
        out = quantizer.dequantize(quantizer.quantize(w, layer), layer)
    else:
        out = quantizer.dequantize(quantizer.quantize(w))
    return out.to(w.dtype)


class BaseQuantizer(nn.Module):
    """Convenience base: an ``nn.Module`` (so ``parameters()`` and ``.to()`` work)
    whose ``forward`` is the fake-quantized tensor."""

    def forward(self, x: torch.Tensor, layer: Optional[Layer] = None) -> torch.Tensor:
        return fake_quantize(self, x, layer)


class TernaryQuantizer(BaseQuantizer):
    """The backend's default (BitNet absmean) as a quantizer object; no parameters."""

    def __init__(self, per_channel: bool = False):
        super().__init__()
        self.per_channel = per_channel

    def quantize(self, x: torch.Tensor) -> TernaryTensor:
        return ternary_quantize(x, self.per_channel)

    def dequantize(self, x: QuantizedTensor) -> torch.Tensor:
        return x.dequantize()


def _differentiable_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Linear interpolation between order statistics: differentiable in q as well.
    s = values.flatten().sort().values
    if s.numel() == 0:  # no values: threshold 0 (q keeps a zero gradient)
        return q * 0.0
    pos = q.clamp(0, 1) * (s.numel() - 1)
    lo = pos.detach().floor().long().clamp(max=s.numel() - 2) if s.numel() > 1 else pos.detach().long() * 0
    hi = (lo + 1).clamp(max=s.numel() - 1)
    frac = pos - lo
    # 1-element index tensors, not 0-d ones: a 0-d index would read its value on the host.
    lo, hi = lo.reshape(1), hi.reshape(1)
    return (s[lo] + frac * (s[hi] - s[lo])).reshape(())


class PercentileQuantizer(BaseQuantizer):
    """Threshold at the ``percentile``-th value of ``|x|`` (learnable: the threshold is
    an interpolated order statistic, differentiable in the percentile, and reaches the
    loss through :func:`learned_quantize`'s surrogate). Scale ``alpha`` = mean ``|x|``
    of the surviving elements (TWN); ``dequantize(x, scale=1.0)`` also multiplies by ``scale``.

    ``percentile`` starts in [0, 1]; where training moves it outside, it acts clamped to [0, 1].
    ``temperature`` (> 0) is the surrogate's width relative to ``alpha``."""

    def __init__(self, percentile: Union[float, torch.Tensor] = 0.7, temperature: float = 0.05):
        super().__init__()
        check_range("percentile", percentile, 0.0, 1.0)
        check_positive("temperature", temperature)
        p = percentile if isinstance(percentile, torch.Tensor) else torch.tensor(float(percentile))
        self.percentile = nn.Parameter(p.detach().clone().float().reshape(()))
        self.temperature = temperature

    def quantize(self, x: torch.Tensor) -> TernaryTensor:
        a = x.detach().abs().float()
        t = _differentiable_quantile(a, self.percentile)
        keep = a > t.detach()
        alpha = (a * keep).sum() / keep.sum().clamp(min=1)
        # Surrogate width relative to the weights' magnitude (a tensor: no host sync, traceable).
        return learned_quantize(x, t, -t, alpha, alpha, temperature=self.temperature * alpha.clamp(min=1e-8))

    def dequantize(self, x: QuantizedTensor, scale: float = 1.0) -> torch.Tensor:
        return x.dequantize(scale)


def _layer_index(layers: Optional[Sequence[str]], layer: Optional[Layer], count: int) -> int:
    if layer is None:
        layer = 0
    if isinstance(layer, str):
        if layers is None:
            raise KeyError(
                f"layer {layer!r} given by name, but the quantizer was built without layers=[module paths] "
                "(the backend names layers by module path, e.g. 'fc1')"
            )
        if layer not in layers:
            raise KeyError(f"unknown layer {layer!r}; known layers: {list(layers)}")
        return list(layers).index(layer)
    if not 0 <= layer < count:
        raise IndexError(f"layer index {layer} out of range for {count} layers")
    return layer


class LayerAdaptiveQuantizer(BaseQuantizer):
    """Per-layer learnable ternary quantizer: ``trits = learned_quantize(x / s_l,
    t_pos_l, t_neg_l)``, value ``trits * s_l``. Thresholds are in units of the
    layer's scale ``s_l``, so they do not depend on the weights' magnitude (thresholds
    multiplied by ``s_l`` would). ``threshold`` starts >= 0 and ``scale`` > 0; the forward
    uses ``|s_l|`` (at least 1e-8), so a scale trained to or through zero stays finite."""

    def __init__(
        self,
        num_layers: Optional[int] = None,
        *,
        layers: Optional[Sequence[str]] = None,
        threshold: float = 0.5,
        scale: Union[float, Sequence[float]] = 1.0,
    ):
        super().__init__()
        if num_layers is None and layers is None:
            raise ValueError("give num_layers or layers (module paths)")
        if layers is None:
            check_int("num_layers", num_layers, 1)
        check_range("threshold", threshold, 0.0)
        check_positive("scale", scale if isinstance(scale, (numbers.Real, torch.Tensor)) else torch.tensor(scale))
        self.layers = list(layers) if layers is not None else None
        n = len(self.layers) if self.layers is not None else num_layers
        self.pos_threshold = nn.Parameter(torch.full((n,), float(threshold)))
        self.neg_threshold = nn.Parameter(torch.full((n,), -float(threshold)))
        scales = torch.as_tensor(scale, dtype=torch.float32)
        self.scales = nn.Parameter(scales.expand(n).clone() if scales.dim() == 0 else scales.clone())

    def quantize(self, x: torch.Tensor, layer_idx: Optional[Layer] = None) -> TernaryTensor:
        i = _layer_index(self.layers, layer_idx, self.scales.numel())
        s = positive(self.scales[i])
        t = learned_quantize(x / s, self.pos_threshold[i], self.neg_threshold[i])
        # Rebuild with the layer scale as the tensor's own scale (exact gradient to s).
        return TernaryTensor(t.codes, s, grad_carrier=None if t.grad_carrier is None else t.grad_carrier * s.detach())

    def dequantize(self, x: QuantizedTensor, layer_idx: Optional[Layer] = None) -> torch.Tensor:
        return x.dequantize()


class MixedPrecisionQuantizer(BaseQuantizer):
    """Per-layer ``"binary"`` (sign, scale mean|x|) or ``"ternary"`` (absmean)."""

    MODES = ("binary", "ternary")

    def __init__(self, layer_modes: Sequence[str], *, layers: Optional[Sequence[str]] = None):
        super().__init__()
        bad = [m for m in layer_modes if m not in self.MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; supported: {', '.join(self.MODES)}")
        if layers is not None and len(layers) != len(layer_modes):
            raise ValueError(f"{len(layers)} layers but {len(layer_modes)} modes")
        self.layer_modes = list(layer_modes)
        self.layers = list(layers) if layers is not None else None

    def quantize(self, x: torch.Tensor, layer_idx: Optional[Layer] = None) -> TernaryTensor:
        mode = self.layer_modes[_layer_index(self.layers, layer_idx, len(self.layer_modes))]
        if mode == "ternary":
            return ternary_quantize(x)
        xd = x.detach()
        signs = torch.where(xd >= 0, 1, -1).to(torch.int8)
        return TernaryTensor(signs, xd.abs().float().mean().clamp(min=1e-5), grad_carrier=ste_carrier(x))

    def dequantize(self, x: QuantizedTensor, layer_idx: Optional[Layer] = None) -> torch.Tensor:
        return x.dequantize()


class PerLayerQuantizer(BaseQuantizer):
    """One quantizer per layer, chosen by module path: e.g. an LSQ step size per linear,
    as LSQ intends, where a single quantizer object would share one across all layers.

    Build it with :meth:`for_model` before creating the optimizer, so the optimizer sees
    every layer's parameters."""

    def __init__(self, quantizers: dict):
        super().__init__()
        bad = [k for k, q in quantizers.items() if not isinstance(q, nn.Module)]
        if bad:
            raise TypeError(f"PerLayerQuantizer holds nn.Module quantizers; not modules: {bad}")
        self.layers = list(quantizers)
        self.per_layer = nn.ModuleList(quantizers.values())

    @classmethod
    def for_model(cls, model: nn.Module, factory, exclude: Sequence[str] = ("lm_head",)) -> "PerLayerQuantizer":
        """``factory(weight) -> quantizer`` for every ``nn.Linear`` of ``model`` not matched by
        ``exclude`` (the backend's rule: a glob on the module path or a dotted suffix of it)."""
        cfg = BitConfig(exclude=list(exclude))
        found = {
            path: factory(m.weight)
            for path, m in model.named_modules()
            if isinstance(m, nn.Linear) and not cfg.excluded(path)
        }
        return cls(found)

    def _pick(self, layer_idx):
        return self.per_layer[_layer_index(self.layers, layer_idx, len(self.layers))]

    def quantize(self, x: torch.Tensor, layer_idx: Optional[Layer] = None) -> QuantizedTensor:
        return self._pick(layer_idx).quantize(x)

    def dequantize(self, x: QuantizedTensor, layer_idx: Optional[Layer] = None) -> torch.Tensor:
        return self._pick(layer_idx).dequantize(x)

    def fake_quantize(self, x: torch.Tensor, layer_idx: Optional[Layer] = None) -> torch.Tensor:
        return fake_quantize(self._pick(layer_idx), x)


__all__ = [
    "WeightQuantizer",
    "BaseQuantizer",
    "TernaryQuantizer",
    "PercentileQuantizer",
    "LayerAdaptiveQuantizer",
    "MixedPrecisionQuantizer",
    "PerLayerQuantizer",
    "fake_quantize",
    "check_quantizer",
]
