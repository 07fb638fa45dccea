"""``TernaryConv2d``: ternary convolution with learnable per-channel
thresholds and scales, running statistics and a quantization report.

For output channel ``c`` with weights ``W_c`` and ``m_c = mean|W_c|``:

    trit = +1 if W > delta_c * m_c,  -1 if W < -delta_c * m_c,  else 0
    W_q  = alpha_c * trit

``delta`` (the threshold, relative to ``m_c``) and ``alpha`` (the scale) are
parameters. Gradients follow :func:`bitcompile.quant.learned_quantize`: the STE for
``W``, the exact gradient for ``alpha``, a sigmoid surrogate for ``delta``.
Activations are optionally fake-quantized per pixel (absmax, ``activation_bits``).
While training, buffers track each channel's zero fraction and the input's absmax
(exponential moving averages with ``momentum``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bitcompile.quant.functional import _fake_quantize_channels
from bitcompile.quant.primitives import learned_quantize
from bitcompile.quant.tensor import TernaryTensor


class TernaryConv2d(nn.Conv2d):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        *,
        threshold: float = 0.7,
        activation_bits: Optional[int] = None,
        momentum: float = 0.1,
        temperature: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        if activation_bits is not None and not 2 <= activation_bits <= 8:
            raise ValueError(f"activation_bits must be in 2..8 or None, got {activation_bits}")
        self.activation_bits, self.momentum, self.temperature = activation_bits, momentum, temperature
        self.threshold = nn.Parameter(torch.full((out_channels,), float(threshold), device=device))
        # alpha starts at the mean |W_c| of the weights above threshold (TWN's optimum for a fixed delta).
        self.alpha = nn.Parameter(self._initial_alpha())
        self.register_buffer("running_sparsity", torch.zeros(out_channels, device=device))
        self.register_buffer("running_input_absmax", torch.zeros((), device=device))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

    @torch.no_grad()
    def _initial_alpha(self) -> torch.Tensor:
        w = self.weight.detach().flatten(1).float()
        m = w.abs().mean(1, keepdim=True)
        kept = w.abs() > self.threshold.detach()[:, None] * m
        return ((w.abs() * kept).sum(1) / kept.sum(1).clamp(min=1)).clamp(min=1e-5)

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """Re-initialize ``alpha`` from the current weights (e.g. after loading float weights)."""
        self.alpha.copy_(self._initial_alpha())

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, 1, 1)

    def quantize_weight(self) -> TernaryTensor:
        """The ternary weights (trits, per-channel ``alpha``), carrying the gradients."""
        m = self._view(self.weight.detach().abs().float().mean(dim=(1, 2, 3)))
        t = self._view(self.threshold) * m
        alpha = self._view(self.alpha)
        return learned_quantize(self.weight, t, -t, alpha, alpha, temperature=self.temperature * m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize_weight()
        if self.training:
            self._track(x, q)
        if self.activation_bits is not None:
            x = _fake_quantize_channels(x, self.activation_bits)
        return self._conv_forward(x, q.dequantize(dtype=x.dtype), self.bias)

    @torch.no_grad()
    def _track(self, x: torch.Tensor, q: TernaryTensor) -> None:
        sparsity = (q.codes == 0).float().flatten(1).mean(1)
        absmax = x.detach().abs().amax().float()
        if int(self.num_batches_tracked) == 0:
            self.running_sparsity.copy_(sparsity)
            self.running_input_absmax.copy_(absmax)
        else:
            self.running_sparsity.lerp_(sparsity, self.momentum)
            self.running_input_absmax.lerp_(absmax, self.momentum)
        self.num_batches_tracked += 1

    @torch.no_grad()
    def quantization_report(self) -> dict:
        """Per-channel and overall statistics of the current ternary weights."""
        q = self.quantize_weight()
        codes = q.codes.flatten(1)
        deq = q.dequantize()
        n = codes.numel()
        return {
            "fraction_negative": int((codes == -1).sum()) / n,
            "fraction_zero": int((codes == 0).sum()) / n,
            "fraction_positive": int((codes == 1).sum()) / n,
            "channel_sparsity": (codes == 0).float().mean(1).tolist(),
            "threshold": self.threshold.tolist(),
            "alpha": self.alpha.tolist(),
            "mse": float(((self.weight.float() - deq) ** 2).mean()),
            "running_sparsity": self.running_sparsity.tolist(),
            "running_input_absmax": float(self.running_input_absmax),
            "num_batches_tracked": int(self.num_batches_tracked),
        }

    def extra_repr(self) -> str:
        acts = f"A{self.activation_bits}" if self.activation_bits else "A-float"
        return f"{super().extra_repr()}, ternary (learned per-channel thresholds and scales), {acts}"
