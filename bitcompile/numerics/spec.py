"""The numbers every layer of bitcompile agrees on: schemes, bit widths, clamps.

BitNet b1.58 semantics (``reference`` computes them in plain torch):

* weights: ``s_w = mean|W|`` (ternary, binary) or ``max|W| / 127`` (int8), per tensor or per
  output channel, clamped at :data:`EPS`;
* activations: per token ``s_x = max|x| / qmax(bits)`` (``max|x|`` clamped at :data:`EPS`),
  ``q = clip(round(x / s_x), -qmax - 1, qmax)``;
* output: ``(q @ W_int^T) * s_x * s_w (+ bias)``, the integer product exact in int32.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

EPS = 1e-5
# Gradients are often far below EPS: their per-row scale is clamped only where amax / qmax
# would leave float32's normal range (rows whose largest |g| is below this quantize to zero).
GRAD_EPS = 2.0**-100

WEIGHT_SCHEMES = ("ternary", "binary", "int8")
GRANULARITIES = ("per_tensor", "per_channel")
# The bit widths the int8 kernels take (activations, attention matmuls, output gradients).
MIN_BITS, MAX_BITS = 2, 8
# Norms fused with activation quantization (``reference.normalize``).
NORM_KINDS = ("none", "rms", "rms_fp32", "layer")
# Activations fused into a linear's epilogue (``reference.activation``). "swiglu" halves the width:
# ``silu(gate) * up`` over weight rows interleaved gate, up, gate, ... (``reference.interleave_rows``).
ACTIVATIONS = ("none", "relu", "gelu", "silu", "relu2", "gelu_tanh", "swiglu")
# What the weight rewrites take; anything else stays in float, with the reason in the report.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", "cuda")


def qmax(bits: int) -> int:
    """Largest positive code of a signed ``bits``-bit integer."""
    return 2 ** (bits - 1) - 1


def check_bits(name: str, value: Any, none_means: Optional[str] = None) -> None:
    """``value`` is an int in ``MIN_BITS..MAX_BITS``, or None where ``none_means`` says what None
    selects; else a ValueError naming ``name`` and the valid range."""
    valid_int = isinstance(value, int) and not isinstance(value, bool) and MIN_BITS <= value <= MAX_BITS
    if not (valid_int or (value is None and none_means is not None)):
        allowed = f"an int in {MIN_BITS}..{MAX_BITS}" + (f" or None ({none_means})" if none_means else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_int(name: str, value: Any, low: int) -> None:
    """``value`` is an integer (not a bool) >= ``low``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def weight_skip_reason(weight: torch.Tensor, x: Optional[torch.Tensor] = None, unit: str = "features") -> str:
    """Why a linear or conv with this ``weight`` (``[out, in]`` as ``F.linear`` takes it, or a conv's
    ``[C_out, C_in / groups, *kernel]``) and input ``x`` (None where not known) stays in float; ''
    if its tensors allow quantizing it. Real tensors or their metadata (fake tensors): the passes ask
    it about traced values and ``reference_model`` about a module's weight, so the eager twin skips
    exactly the layers the backend skips. ``unit`` names the weight's dimensions in the reason."""
    named = ([("x", x)] if x is not None else []) + [("W", weight)]
    if any(t.dtype not in FLOAT_DTYPES for _, t in named):
        dtypes = ", ".join(f"{name}={t.dtype}" for name, t in named)
        return f"unsupported dtype {dtypes} (supported: float32, float16, bfloat16)"
    device = next((t.device.type for _, t in named if t.device.type not in DEVICES), None)
    if device is not None:
        return f"unsupported device {device} (supported: {', '.join(DEVICES)})"
    if weight.dim() < 2:
        return f"unsupported weight shape {tuple(weight.shape)}"
    # An empty weight has nothing to quantize (and no scale); the float op gives the empty/bias result.
    if weight.shape[0] == 0:
        return f"zero output {unit}"
    if any(size == 0 for size in weight.shape[1:]):
        return f"zero input {unit}"
    return ""
