"""The numbers every layer of bitcompile agrees on: schemes, bit widths, clamps.

BitNet b1.58 semantics (``reference`` computes them in plain torch):

* weights: ``s_w = mean|W|`` (ternary, binary) or ``max|W| / 127`` (int8), per tensor or per
  output channel, clamped at :data:`EPS`;
* activations: per token ``s_x = max|x| / qmax(bits)`` (``max|x|`` clamped at :data:`EPS`),
  ``q = clip(round(x / s_x), -qmax - 1, qmax)``;
* output: ``(q @ W_int^T) * s_x * s_w (+ bias)``, the integer product exact in int32.
"""
from __future__ import annotations

from typing import Any, Optional

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
# Activations fused into a linear's epilogue (``reference.activation``).
ACTIVATIONS = ("none", "relu", "gelu", "silu", "relu2", "gelu_tanh")


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
