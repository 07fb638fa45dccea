"""``BitLinear``: the eager reference for a compiled linear, and a layer in its own right.

A drop-in for ``nn.Linear`` (same constructor, same ``weight``/``bias`` state dict)
that quantizes exactly as the backend does, through the same ``bitnet`` ops.
With ``norm=True`` it is the BitNet layer with RMSNorm: RMSNorm, then 8-bit activations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.numerics import reference as ref
from bitcompile.ops import WEIGHT_CACHE


class BitLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        norm: bool = False,
        eps: float = 1e-6,
        weight: str = "ternary",
        activation_bits: Optional[int] = 8,
        granularity: Optional[str] = None,
        grad_input_bits: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = BitConfig(
            weight=weight,
            activation_bits=activation_bits,
            granularity=granularity,
            exclude=[],
            grad_input_bits=grad_input_bits,
        )
        self.norm = nn.RMSNorm(in_features, eps=eps, device=device, dtype=dtype) if norm else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "BitLinear":
        """A BitLinear sharing ``linear``'s parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        layer.weight, layer.bias = linear.weight, linear.bias
        if layer.norm is not None:
            layer.norm = nn.RMSNorm(
                linear.in_features, eps=layer.norm.eps, device=linear.weight.device, dtype=linear.weight.dtype
            )
        return layer

    def packed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wq, scale)``: re-quantized while training, cached otherwise."""
        cfg = self.config
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.ops.bitnet.quantize_weights(self.weight, cfg.weight, cfg.per_channel)
        return WEIGHT_CACHE.get(self.weight, cfg.weight, cfg.per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if 0 in self.weight.shape:  # nothing to quantize: nn.Linear's empty (or bias) result, as compiled
            return super().forward(x)
        x = ref.autocast_input(x)
        xq = x_scale = None
        if self.config.activation_bits is not None:
            xq, x_scale = torch.ops.bitnet.quantize_activations(x, self.config.activation_bits)
        wq, w_scale = self.packed_weight()
        return torch.ops.bitnet.lowbit_linear(
            x, self.weight, self.bias, xq, x_scale, wq, w_scale, self.config.grad_input_bits
        )

    def extra_repr(self) -> str:
        cfg = self.config
        acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
        grads = f", grad_input int{cfg.grad_input_bits}" if cfg.grad_input_bits else ""
        return (
            f"{super().extra_repr()}, {cfg.weight}, {acts}, {'per-channel' if cfg.per_channel else 'per-tensor'}{grads}"
        )
