"""Model quantizers: the model-level linear swapper ``Quantizer`` and ``BitNetQuantizer``.

``Quantizer(model, W8A16Linear, ["lm_head"])`` replaces, in place, every
``nn.Linear`` of ``model`` whose module path is not excluded by a layer of the given
class, built as ``cls(in_features, out_features, bias, dtype=...)`` and filled by
``layer.quantize(weight)`` (and ``layer.bias``), and records the memory footprint
before and after. (This is ``bitcompile.Quantizer``; the weight-quantizer protocol is
``bitcompile.quant.WeightQuantizer``.)
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitnet)
from bitcompile.config import excluding_pattern
from bitcompile.numerics import reference as ref
from bitcompile.quant.primitives import ste_carrier
from bitcompile.quant.tensor import QuantizedTensor, TernaryTensor


def memory_footprint(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (as transformers' ``get_memory_footprint``)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Quantizer:
    """Swap ``model``'s ``nn.Linear`` layers for ``layer_cls`` in place.

    ``exclude`` holds child names or module-path globs (``"lm_head"`` matches
    ``model.lm_head``). After construction: ``replaced`` (the module paths),
    ``memory_before`` / ``memory_after`` (bytes) and ``model``."""

    def __init__(self, model: nn.Module, layer_cls: type, exclude: Optional[Iterable[str]] = None):
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in (exclude or [])):
            raise ValueError(f"exclude must be a list of layer names or module-path globs, got {exclude!r}")
        exclude = list(exclude or [])
        if not callable(getattr(layer_cls, "quantize", None)):
            raise TypeError(f"{layer_cls.__name__} has no quantize(weight) method (e.g. bitcompile.nn.W8A16Linear)")
        self.model = model
        self.memory_before = memory_footprint(model)
        self.replaced: list[str] = []
        for path, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                child_path = f"{path}.{name}" if path else name
                if type(child) is nn.Linear and not excluding_pattern(child_path, exclude):
                    setattr(module, name, self._convert(child, layer_cls))
                    self.replaced.append(child_path)
        self.memory_after = memory_footprint(model)

    @staticmethod
    def _convert(linear: nn.Linear, layer_cls: type) -> nn.Module:
        w = linear.weight
        layer = layer_cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype)
        layer.to(w.device)
        layer.quantize(w.detach())
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def __repr__(self) -> str:
        return (
            f"Quantizer(replaced {len(self.replaced)} Linear layers; memory {self.memory_before / 2**20:.2f} MiB -> "
            f"{self.memory_after / 2**20:.2f} MiB)"
        )


class BitNetQuantizer:
    """Quantize weights and activations to ``precision`` bits.

    ``precision``: ``1.58`` (or ``"ternary"``, BitNet b1.58 absmean, one scale per
    tensor), ``1`` (binary, scale mean|W|), or an int 2..8 (symmetric absmax, one
    scale per output channel). Activations: per-token absmax with ``precision`` bits
    (8 bits when ``precision < 2``, as BitNet). Results are ``QuantizedTensor`` /
    ``TernaryTensor`` (codes + scale), so ``dequantize(q)`` needs nothing else; they
    carry the STE gradient when their input requires grad.
    """

    def __init__(self, precision: Union[int, float, str] = 8):
        if precision in ("ternary", 1.58):
            self.scheme, self.bits = "ternary", 1.58
        elif precision in ("binary", 1):
            self.scheme, self.bits = "binary", 1
        elif isinstance(precision, int) and not isinstance(precision, bool) and 2 <= precision <= 8:
            self.scheme, self.bits = "int", precision
        else:
            raise ValueError(f"precision must be 1.58 ('ternary'), 1 ('binary') or an int in 2..8, got {precision!r}")
        self.precision = precision

    @property
    def activation_bits(self) -> int:
        return self.bits if self.scheme == "int" else 8

    def quantize_weights(self, weight: torch.Tensor) -> QuantizedTensor:
        w = weight.detach()
        if self.scheme in ("ternary", "binary"):
            s = ref.weight_scale(w.reshape(1, -1), "ternary", False).reshape(())
            codes = ref.weight_integers(w, s, self.scheme)
            return TernaryTensor(codes, s, grad_carrier=ste_carrier(weight))
        qmax = 2 ** (self.bits - 1) - 1
        rows = w.reshape(w.shape[0], -1).float() if w.dim() > 1 else w.float().reshape(1, -1)
        s = (rows.abs().amax(dim=1) / qmax).clamp(min=ref.EPS)
        codes = (rows / s[:, None]).round().clamp(-qmax, qmax).to(torch.int8).reshape(w.shape)
        scale = s.reshape(-1, *([1] * (w.dim() - 1))) if w.dim() > 1 else s.reshape(())
        return QuantizedTensor(codes, scale, grad_carrier=ste_carrier(weight))

    def quantize_activations(self, x: torch.Tensor) -> QuantizedTensor:
        q, s = torch.ops.bitnet.quantize_activations(x.detach(), self.activation_bits)
        return QuantizedTensor(q, s, grad_carrier=ste_carrier(x))

    def dequantize(self, q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return q.dequantize(dtype=dtype or torch.float32)

    def __repr__(self) -> str:
        return f"BitNetQuantizer(precision={self.precision!r})"
