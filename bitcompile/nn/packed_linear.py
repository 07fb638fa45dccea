"""``PackedLinear``: a linear that holds only its packed weights, for deployment.

Its state is what inference needs: ``weight_packed`` (2-bit codes, uint8 ``[N, ceil(K/4)]``, or
int8 ``[N, K]``), ``weight_scale`` (float32 ``[1]`` or ``[N]``) and ``bias``, all buffers. There
is no latent float weight, so the layer cannot be trained: a forward that would need gradients
raises instead of silently training nothing. It computes what a compiled ``nn.Linear`` computes
in inference (the same ops: per-token activation quantization, then ``linear_q``), in eager and
under ``torch.compile(backend="bitnet")``, where the fusions apply as for any linear.
``bitcompile.deploy(model)`` and ``bitcompile.load_packed(model, path, deploy=True)`` swap these
in for a model's quantized linears.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import packed_columns


class PackedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight: str = "ternary",
        per_channel: bool = False,
        activation_bits: Optional[int] = 8,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.config = BitConfig(
            weight=weight,
            activation_bits=activation_bits,
            granularity="per_channel" if per_channel else "per_tensor",
            exclude=[],
        )
        self.in_features, self.out_features = in_features, out_features
        # what forward reads, as a plain attribute: under torch.compile each attribute read is a
        # guard checked on every call, and a decode step's host time is mostly those checks
        self.activation_bits = activation_bits
        codes = (out_features, in_features) if weight == "int8" else (out_features, packed_columns(in_features))
        code_dtype = torch.int8 if weight == "int8" else torch.uint8
        self.register_buffer("weight_packed", torch.zeros(codes, dtype=code_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "PackedLinear":
        """``linear`` quantized as the backend would under ``options`` (``weight``,
        ``granularity``, ``activation_bits``); its float weight is not kept."""
        cfg = BitConfig.from_options({**options, "exclude": []})
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight=cfg.weight,
            per_channel=cfg.per_channel,
            activation_bits=cfg.activation_bits,
            device="meta",
        )
        with torch.no_grad():
            wq, scale = torch.ops.bitnet.quantize_weights(linear.weight.detach(), cfg.weight, cfg.per_channel)
        layer.weight_packed, layer.weight_scale = wq, scale
        layer.bias = None if linear.bias is None else linear.bias.detach().clone()
        return layer

    def _apply(self, fn, recurse=True):
        # The scales stay float32 under .half() / .to(dtype): only their device follows.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "PackedLinear holds only packed weights and cannot be trained or backpropagated through; run it "
                "under torch.no_grad()/inference_mode(), or load the checkpoint into a float model with "
                "bitcompile.load_packed(model, path) to continue quantization-aware training"
            )
        x = ref.autocast_input(x)
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        bits = self.activation_bits
        if bits is None:  # weight-only: float activations times the integer weights
            return torch.ops.bitnet.weight_only_linear(x, self.weight_packed, self.weight_scale, bias, self.in_features)
        xq, x_scale = torch.ops.bitnet.quantize_activations(x, bits)
        return torch.ops.bitnet.linear_q(
            xq, x_scale, self.weight_packed, self.weight_scale, bias, self.in_features, dtype, "none", None
        )

    def extra_repr(self) -> str:
        cfg = self.config
        acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
        granularity = "per-channel" if cfg.per_channel else "per-tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{cfg.weight} packed, {acts}, {granularity}"
        )
