"""``W8A16Linear``: int8 weights with per-output-channel scales, float activations.

    scales = max|W| over in_features / 127      int8_weights = round(W / scales)
    y      = (x @ int8_weights^T) * scales + bias

Weights and scales are buffers (the layer is for inference), computed with the
backend's int8 weight quantizer and run through the ``bitnet`` ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitnet)
from bitcompile.numerics import reference as ref


class W8A16Linear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "int8_weights", torch.randint(-128, 127, (out_features, in_features), dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.randn(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.randn(out_features, dtype=dtype, device=device) if bias else None)

    @torch.no_grad()
    def quantize(self, weights: torch.Tensor) -> None:
        """Store ``weights [out, in]`` as int8 with per-channel absmax scales."""
        if tuple(weights.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weights must be [{self.out_features}, {self.in_features}], got {tuple(weights.shape)}")
        scale = ref.weight_scale(weights, "int8", per_channel=True)
        self.int8_weights = ref.weight_integers(weights, scale, "int8").to(self.int8_weights.device)
        self.scales = scale.to(self.scales.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A16Linear":
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        layer.quantize(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: Optional[torch.Tensor] = self.bias
        return torch.ops.bitnet.weight_only_linear(x, self.int8_weights, self.scales.float(), bias, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, W8A16"


W8A16LinearLayer = W8A16Linear  # an alias under the longer name
