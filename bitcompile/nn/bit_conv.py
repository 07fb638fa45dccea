"""``BitConv1d`` / ``BitConv2d``: eager references for a compiled convolution.

Drop-ins for ``nn.Conv1d`` / ``nn.Conv2d`` (same constructor and state dict) that quantize
exactly as the conv pass does, through the same ``bitnet`` ops: one int8 absmax scale
per sample for activations, ``W.flatten(1)`` quantized like a linear's weight.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.numerics import reference as ref


class _BitConvMixin:
    def _init_bit(self, weight: str, activation_bits: Optional[int], granularity: Optional[str]) -> None:
        self.config = BitConfig(weight=weight, activation_bits=activation_bits, granularity=granularity, exclude=[])

    def _padding_ints(self) -> list[int]:
        if self.padding == "valid":
            return [0] * len(self.kernel_size)
        if self.padding == "same":
            totals = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            if any(t % 2 for t in totals):
                raise ValueError(
                    "BitConv supports padding='same' only where it is symmetric (odd kernel extent); "
                    "pad explicitly instead"
                )
            return [t // 2 for t in totals]
        return list(self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.weight.dim():
            raise ValueError(f"{type(self).__name__} needs batched input ({self.weight.dim()}-D), got {x.dim()}-D")
        if 0 in self.weight.shape:  # nothing to quantize: the float conv's result, as compiled
            return super().forward(x)
        x = ref.autocast_input(x)
        if self.padding_mode != "zeros":  # padded here (also asymmetric "same"), then a conv without padding
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = [0] * len(self.kernel_size)
        else:
            padding = self._padding_ints()
        cfg = self.config
        xq = x_scale = None
        if cfg.activation_bits is not None:
            xq, x_scale = torch.ops.bitnet.quantize_activations_per_sample(x, cfg.activation_bits)
        # Re-quantized on every call: this layer is the oracle, the compiled path is the fast one.
        wq, w_scale = torch.ops.bitnet.quantize_weights(self.weight.flatten(1), cfg.weight, cfg.per_channel)
        return torch.ops.bitnet.lowbit_conv(
            x,
            self.weight,
            self.bias,
            xq,
            x_scale,
            wq,
            w_scale,
            list(self.stride),
            padding,
            list(self.dilation),
            self.groups,
        )

    @classmethod
    def from_conv(cls, conv, **kwargs):
        """A BitConv sharing ``conv``'s parameters (no copy)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            **kwargs,
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def extra_repr(self) -> str:
        cfg = self.config
        acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
        return f"{super().extra_repr()}, {cfg.weight}, {acts}, {'per-channel' if cfg.per_channel else 'per-tensor'}"


class BitConv1d(_BitConvMixin, nn.Conv1d):
    def __init__(
        self,
        *args,
        weight: str = "ternary",
        activation_bits: Optional[int] = 8,
        granularity: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_bit(weight, activation_bits, granularity)


class BitConv2d(_BitConvMixin, nn.Conv2d):
    def __init__(
        self,
        *args,
        weight: str = "ternary",
        activation_bits: Optional[int] = 8,
        granularity: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_bit(weight, activation_bits, granularity)
