"""Gradient estimators and advanced quantization techniques.

STE, clipped STE, soft (tanh) and Gumbel-softmax quantization, progressive
quantization, differentiable sparse quantization and quantization-aware batch
norm. Each returns a float tensor: the quantized value in the forward, the
documented surrogate in the backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bitcompile.quant.primitives import check_positive, check_range, sparsity_mask, ternary_quantize
from bitcompile.quant.tensor import QuantizedTensor

LEVELS = (-1.0, 0.0, 1.0)


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, identity gradient to ``x`` in the backward.

    Written ``value + (x - x.detach())`` rather than ``x + (value - x).detach()`` so
    the forward is exactly ``value`` (the second form rounds twice)."""
    return value.detach().to(x.dtype) + (x - x.detach())


def _hard_value(x: torch.Tensor, quantize_fn: Callable) -> torch.Tensor:
    with torch.no_grad():
        q = quantize_fn(x.detach())
        return q.dequantize() if isinstance(q, QuantizedTensor) else q


def ste_quantize(x: torch.Tensor, quantize_fn: Callable = ternary_quantize) -> torch.Tensor:
    """Forward ``dequantize(quantize_fn(x))``, backward ``dL/dx = dL/dy``."""
    return straight_through(x, _hard_value(x, quantize_fn))


def clipped_ste_quantize(
    x: torch.Tensor, threshold: float = 1.0, quantize_fn: Callable = ternary_quantize
) -> torch.Tensor:
    """Forward as :func:`ste_quantize`; gradient passes where ``|x| <= threshold`` (finite, >= 0),
    0 elsewhere."""
    check_range("threshold", threshold, 0.0)
    mask = (x.detach().abs() <= threshold).to(x.dtype)
    passed = x * mask
    return _hard_value(x, quantize_fn).to(x.dtype) + (passed - passed.detach())


def soft_quantize(x: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> torch.Tensor:
    """``tanh(x / temperature)`` (converges to ``sign(x)`` as temperature -> 0).
    ``hard``: ``sign(x)`` in the forward, the tanh gradient in the backward."""
    check_positive("temperature", temperature)
    soft = torch.tanh(x / temperature)
    if not hard:
        return soft
    return torch.sign(x.detach()) + (soft - soft.detach())


def _level_logits(x: torch.Tensor) -> torch.Tensor:
    # Score of each level: minus the squared distance to it, so the nearest level of
    # {-1, 0, 1} is the most likely.
    levels = torch.tensor(LEVELS, dtype=x.dtype, device=x.device)
    return -((x.unsqueeze(-1) - levels) ** 2)


def _expected_level(probs: torch.Tensor) -> torch.Tensor:
    return probs[..., 2] - probs[..., 0]


def gumbel_softmax_quantize(
    x: torch.Tensor, temperature: float = 1.0, hard: bool = False, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Gumbel-softmax over the levels {-1, 0, 1}: ``probs = softmax((logits + g) / T)``
    with Gumbel noise ``g``; output ``probs[+1] - probs[-1]``. ``hard``: the sampled
    level (exactly -1, 0 or 1) in the forward, the soft gradient in the backward."""
    check_positive("temperature", temperature)
    u = torch.rand((*x.shape, 3), generator=generator, device=x.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7))).to(x.dtype)
    probs = torch.softmax((_level_logits(x) + gumbel) / temperature, dim=-1)
    soft = _expected_level(probs)
    if not hard:
        return soft
    level = (probs.detach().argmax(dim=-1) - 1).to(x.dtype)
    return level + (soft - soft.detach())


def progressive_quantize(
    x: torch.Tensor, epoch: int, warmup_epochs: int = 10, quantize_fn: Callable = ternary_quantize
) -> torch.Tensor:
    """Blend ``(1 - a) * x + a * ste_quantize(x)`` with ``a = epoch / warmup_epochs``,
    fully quantized from ``epoch >= warmup_epochs``."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return ste_quantize(x, quantize_fn)
    alpha = max(epoch, 0) / warmup_epochs
    return (1 - alpha) * x + alpha * ste_quantize(x, quantize_fn)


def threshold_for_sparsity(x: torch.Tensor, target_sparsity: float) -> torch.Tensor:
    """The largest ``|x|`` that :func:`sparsity_mask` zeroes (0 if none)."""
    keep = sparsity_mask(x, target_sparsity, "target_sparsity")
    dropped = x.detach().abs()[~keep]
    return dropped.max() if dropped.numel() else x.new_zeros(())


def differentiable_sparse_quantize(x: torch.Tensor, target_sparsity: float, temperature: float = 1.0) -> torch.Tensor:
    """Soft ternary ``p(+1) - p(-1)`` from logits ``((x - t), (t - |x|), (-x - t)) / T``
    with ``t`` the threshold giving ``target_sparsity`` zeros. The zero logit is
    ``t - |x|`` (``-|x - t|`` would not favour 0 at ``x = 0``)."""
    check_positive("temperature", temperature)
    t = threshold_for_sparsity(x, target_sparsity).to(x.dtype)  # checks target_sparsity is in [0, 1]
    logits = torch.stack([(-x - t), (t - x.abs()), (x - t)], dim=-1) / temperature
    return _expected_level(torch.softmax(logits, dim=-1))


def quantized_batch_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    quantize_fn: Callable = ternary_quantize,
) -> torch.Tensor:
    """Batch norm (updating the running statistics while ``training``), then
    :func:`ste_quantize` of the normalized output."""
    y = F.batch_norm(x, running_mean, running_var, gamma, beta, training, momentum, eps)
    return ste_quantize(y, quantize_fn)


class QuantizedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose output is ternary-quantized with the STE."""

    def __init__(self, num_features: int, quantize_fn: Callable = ternary_quantize, **kwargs):
        super().__init__(num_features, **kwargs)
        self.quantize_fn = quantize_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_quantize(super().forward(x), self.quantize_fn)
