"""Weight quantization + packing: absmean scale -> trits (or signs) -> canonical 2-bit bytes.

Two passes over W, the minimum for a scale that depends on all of W:
  1. ``_abs_row_sum_kernel``: fp32 sum |W| per row (per-channel scale = row sum / K;
     per-tensor = total / numel, reduced from the N row sums).
  2. ``_pack_kernel``: reads W once more, divides by the scale, rounds, clips and
     writes four 2-bit codes per byte.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import round_half_even

EPS = 1e-5
SCHEMES = {"ternary": 0, "binary": 1}


@triton.jit
def _abs_row_sum_kernel(W, OUT, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + (k0 + cols)[None, :],
                    mask=(rows[:, None] < N) & ((k0 + cols)[None, :] < K), other=0.0)
        acc += tl.abs(w.to(tl.float32))
    tl.store(OUT + rows, tl.sum(acc, axis=1), mask=rows < N)


@triton.jit
def _pack_kernel(W, S, P, N, K, KB, stride_w, stride_p,
                 BN: tl.constexpr, BKB: tl.constexpr, PER_CHANNEL: tl.constexpr, SCHEME: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    c = tl.program_id(1) * BKB + tl.arange(0, BKB)
    if PER_CHANNEL:
        s = tl.load(S + rows, mask=rows < N, other=1.0)[:, None]
    else:
        s = tl.load(S)
    packed = tl.zeros((BN, BKB), dtype=tl.int32)
    for j in tl.static_range(4):
        col = 4 * c + j
        valid = (rows[:, None] < N) & (col[None, :] < K)
        w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + col[None, :], mask=valid, other=0.0).to(tl.float32)
        if SCHEME == 0:
            t = round_half_even(tl.math.div_rn(w, s))  # IEEE division, as the reference
            t = tl.where(t != t, 0.0, t)  # NaN weight -> trit 0, as the reference (before the clamp drops NaN)
            t = tl.minimum(tl.maximum(t, -1.0), 1.0)
        else:
            t = tl.where(w >= 0, 1.0, -1.0)
        t = tl.where(valid, t, 0.0)  # K padding is the zero trit
        packed |= (t.to(tl.int32) + 1) << (2 * j)
    tl.store(P + rows[:, None] * stride_p + c[None, :], packed.to(tl.uint8),
             mask=(rows[:, None] < N) & (c[None, :] < KB))


def quantize_pack(w: torch.Tensor, scheme: str = "ternary", per_channel: bool = False):
    """``W [N, K] float -> (packed uint8 [N, ceil(K/4)], fp32 scale [N] | [1])``."""
    if scheme not in SCHEMES:
        raise ValueError(f"the weight-pack kernel supports {', '.join(SCHEMES)} (got {scheme!r})")
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape
    kb = (k + 3) // 4
    row_sum = torch.empty(n, device=w.device, dtype=torch.float32)
    packed = torch.empty((n, kb), device=w.device, dtype=torch.uint8)
    interp = tuning.interpreting()
    bn, bk = (16, 32) if interp else (4, 1024)
    _abs_row_sum_kernel[(triton.cdiv(n, bn),)](w, row_sum, n, k, w.stride(0), BN=bn, BK=bk, num_warps=4)
    if per_channel:
        scale = (row_sum / k).clamp_(min=EPS)
    else:
        scale = (row_sum.sum() / (n * k)).clamp_(min=EPS).reshape(1)
    bn, bkb = (16, 16) if interp else (16, 128)
    flags = dict(BN=bn, BKB=bkb, PER_CHANNEL=per_channel, SCHEME=SCHEMES[scheme])
    compiled = _pack_kernel[(triton.cdiv(n, bn), triton.cdiv(kb, bkb))](
        w, scale, packed, n, k, kb, w.stride(0), packed.stride(0), num_warps=4, **flags)
    tuning.dump_source(_pack_kernel, compiled, {**flags, "w": str(w.dtype)})
    return packed, scale
