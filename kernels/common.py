"""Small Triton helpers shared by the kernel families."""
from __future__ import annotations

import triton
import triton.language as tl

# Epilogue activations (constexpr ACTIVATION); names as the passes and ops spell them.
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "relu2": 4, "gelu_tanh": 5}


@triton.jit
def round_half_even(y):
    """``torch.round`` semantics (ties to even) without libdevice, so it also runs
    in the interpreter."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def grouped_tile(pid, grid_major, grid_minor, GROUP: tl.constexpr):
    """``(major, minor)`` tile indices of program ``pid`` in grouped order: GROUP consecutive
    major tiles sweep every minor tile together, so their shared operand stays in L2."""
    width = GROUP * grid_minor
    first = (pid // width) * GROUP
    rows = min(grid_major - first, GROUP)
    return first + (pid % width) % rows, (pid % width) // rows


@triton.jit
def unpack_trits(p, BKB: tl.constexpr, BN: tl.constexpr):
    """Packed bytes ``[BN, BKB]`` (canonical format) -> int8 trits ``[BN, 4 * BKB]`` in K order."""
    b = p.to(tl.int32)
    w0 = ((b >> 0) & 3) - 1
    w1 = ((b >> 2) & 3) - 1
    w2 = ((b >> 4) & 3) - 1
    w3 = ((b >> 6) & 3) - 1
    # join(join(w0, w2), join(w1, w3))[n, c, q, p] = w_{2p+q}; flattening gives index 4c + 2q + p.
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(w, (BN, 4 * BKB)).to(tl.int8)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr):
    """fp32 activation, formulas as torch computes them in fp32."""
    if ACTIVATION == 1:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 2:  # exact GELU
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = y / (1.0 + tl.exp(-y))
    elif ACTIVATION == 4:
        r = tl.maximum(y, 0.0)
        y = r * r
    elif ACTIVATION == 5:  # tanh GELU: tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    return y
