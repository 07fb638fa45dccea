"""Per-sample activation quantization for the convolutions, written channels-last.

A conv sums over channels and kernel taps, so its activations get one absmax scale per sample
(``reference.quantize_activations_per_sample``). A sample is far too long for one program
(the norm kernels hold a row in registers), so two launches:

1. ``_absmax_kernel``: SPLITS programs per sample each reduce a slice of it, then combine with
   an integer ``atomic_max`` on the bits of ``max|x|`` (non-negative floats order like their
   bits; NaN's bits are above infinity's, so a NaN anywhere wins, as torch's ``amax``).
2. ``_quantize_kernel``: ``q = round(x / s)`` over ``[positions, channels]`` tiles of an NCHW or
   channels-last input, stored as ``[N, positions, C]`` (channel stride 1), the layout the conv kernel reads.

Divisions are IEEE (``div_rn``), rounding ties to even, NaN -> 0: the reference's integers exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import round_to_int
from bitcompile.numerics import reference as ref
from bitcompile.numerics.spec import EPS as _EPS

EPS = tl.constexpr(_EPS)  # the reference's clamp of max|x|
NAN_BITS = tl.constexpr(0x7FC00000)  # above +inf's bits: the atomic max keeps it


@triton.jit
def _absmax_kernel(X, AMAX, E, PER, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    start = tl.program_id(1) * PER
    base = X + n.to(tl.int64) * E
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    nan = tl.zeros((BLOCK,), dtype=tl.int1)
    for off in range(start, tl.minimum(start + PER, E), BLOCK):
        i = off + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(base + i, mask=(i < E) & (i < start + PER), other=0.0).to(tl.float32))
        acc = tl.maximum(acc, a)
        nan = nan | (a != a)
    bits = tl.max(acc, axis=0).to(tl.int32, bitcast=True)
    bits = tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, NAN_BITS, bits)
    tl.atomic_max(AMAX + n, bits, sem="relaxed")


@triton.jit
def _quantize_kernel(
    X, AMAX, Q, S, C, P, s_xn, s_xc, s_xp, qmax, BC: tl.constexpr, BP: tl.constexpr, USE_ASM: tl.constexpr
):
    n = tl.program_id(0)
    qmax = tl.cast(qmax, tl.float32)
    amax = tl.load(AMAX + n).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(tl.maximum(amax, EPS, propagate_nan=tl.PropagateNan.ALL), qmax)
    pos = tl.program_id(1) * BP + tl.arange(0, BP)
    ch = tl.program_id(2) * BC + tl.arange(0, BC)
    mask = (pos < P)[:, None] & (ch < C)[None, :]
    x = tl.load(X + n.to(tl.int64) * s_xn + pos[:, None] * s_xp + ch[None, :] * s_xc, mask=mask, other=0.0)
    q = round_to_int(tl.math.div_rn(x.to(tl.float32), scale), -qmax.to(tl.int32) - 1, qmax.to(tl.int32), USE_ASM)
    tl.store(Q + n.to(tl.int64) * P * C + pos[:, None] * C + ch[None, :], q.to(tl.int8), mask=mask)
    if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
        tl.store(S + n, scale)


def quantize_per_sample(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, C, *S]`` (any float dtype and layout) -> ``(int8 [N, C, *S]`` channels-last, ``float32
    [N, 1, ...])``, equal to ``reference.quantize_activations_per_sample``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    if x.dim() < 3:
        raise ValueError(f"per-sample quantization needs [N, C, *spatial] input, got {tuple(x.shape)}")
    nb, c = x.shape[:2]
    q = ref.channels_last_empty(x, torch.int8)
    scale = torch.empty((nb, *([1] * (x.dim() - 1))), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return q, scale
    if x[0].numel() >= 2**31:
        raise ValueError(f"per-sample quantization indexes a sample with int32: {tuple(x.shape[1:])} is too large")
    # Each sample one dense block whose channels and positions are walked by one stride each:
    # NCHW or channels-last as they are, anything else made contiguous.
    if not (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        x = x.contiguous()
    per_sample = x[0].numel()
    positions = per_sample // c
    s_xc, s_xp = (positions, 1) if x.is_contiguous() else (1, c)
    amax = torch.zeros(nb, device=x.device, dtype=torch.int32)
    interp = tuning.interpreting()
    block = 128 if interp else 2048
    # (the interpreter plans for an H100's 132 SMs, so the tests combine several slices)
    sms = 132 if interp else torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = max(1, min(triton.cdiv(per_sample, 4 * block), triton.cdiv(4 * sms, nb)))  # ~4 programs per SM
    per = triton.cdiv(triton.cdiv(per_sample, splits), block) * block
    _absmax_kernel[(nb, triton.cdiv(per_sample, per))](x, amax, per_sample, per, BLOCK=block, num_warps=4)
    bp, bc = (16, 16) if interp else (64, 64)
    grid = (nb, triton.cdiv(positions, bp), triton.cdiv(c, bc))
    compiled = _quantize_kernel[grid](
        x,
        amax,
        q,
        scale,
        c,
        positions,
        per_sample,
        s_xc,
        s_xp,
        float(2 ** (bits - 1) - 1),
        BC=bc,
        BP=bp,
        USE_ASM=not interp,
        num_warps=4,
    )
    tuning.dump_source(_quantize_kernel, compiled, {"BC": bc, "BP": bp, "x": str(x.dtype)})
    return q, scale
