"""Weight quantization + packing: absmean scale -> trits (or signs) -> 2-bit bytes.

Two passes over W, the minimum for a scale that depends on all of W, both reading
contiguous 2-D tiles (16-byte loads, no gathers of every 4th column):
  1. ``_abs_sum_kernel``: fp32 sum |W| per row, and one partial sum per program (at most
     ``MAX_PARTS`` programs, each looping over its row tiles).
  2. ``_pack_kernel``: computes the scale itself (IEEE division, as the CPU reference:
     row sum / K per channel, or the sum of the partials / (N K) per tensor, summed by every
     program in the same fixed order: no launch of its own for the total, and a scale that is
     deterministic run to run), reads W once more and writes 4 codes per byte, canonical,
     K-blocked ("nibbles") or both, from [BN, 4, 64] tiles. The trits need no division per
     weight: two exact comparisons decide them (see the kernel).
QAT re-quantizes every weight every step, so each launch saved here is saved per linear and
per step: ``quantize_pack_both`` writes the canonical codes (the input gradient's operand) and
the K-blocked ones (the forward matmul's) in one launch, where a relayout would add another.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.layout import pair_digits
from bitcompile.numerics.packing import kblocked_columns
from bitcompile.numerics.spec import EPS

SCALE_MIN = tl.constexpr(EPS)  # the reference's clamp of the scale
SCHEMES = {"ternary": 0, "binary": 1}
LAYOUTS = {"canonical": 0, "kblocked": 1}
Q = 64  # bytes per 256-trit block


MAX_PARTS = 256  # partial sums of |W|: every pack program sums them all (1 KB from L2); 2 abs-sum programs per SM


@triton.jit
def _abs_sum_rows(W, ROWSUM, N, K, stride_w, program, programs, BN: tl.constexpr, BK: tl.constexpr):
    """Row sums of |W| for row tiles ``program``, ``program + programs``, ... stored to ROWSUM;
    returns their total (this program's partial sum)."""
    cols = tl.arange(0, BK)
    part = tl.zeros((BN,), dtype=tl.float32)
    for r0 in range(program * BN, N, programs * BN):
        rows = r0 + tl.arange(0, BN)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
        for k0 in range(0, K, BK):
            w = tl.load(w_ptrs + k0, mask=(rows[:, None] < N) & ((k0 + cols)[None, :] < K), other=0.0)
            acc += tl.abs(w.to(tl.float32))
        row_sum = tl.sum(acc, axis=1)
        tl.store(ROWSUM + rows, row_sum, mask=rows < N)
        part += row_sum
    return tl.sum(part, axis=0)


@triton.jit
def _abs_sum_kernel(W, ROWSUM, PART, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr):
    part = _abs_sum_rows(W, ROWSUM, N, K, stride_w, tl.program_id(0), tl.num_programs(0), BN, BK)
    tl.store(PART + tl.program_id(0), part)


@triton.jit
def _pack_tile(
    W,
    P,
    rows,
    blk,
    s,
    N,
    K,
    KB,
    stride_w,
    stride_p,
    BN: tl.constexpr,
    SCHEME: tl.constexpr,
    KBLOCKED: tl.constexpr,
    QB: tl.constexpr,
):
    """Block ``blk`` (4 QB trits) of ``rows``, quantized with scales ``s`` and stored to ``P``
    in one layout."""
    i = tl.arange(0, 4)[None, :, None]
    j = tl.arange(0, QB)[None, None, :]
    if KBLOCKED:  # quarter i of the block, k = i * QB + j (placed below)
        k = blk * 4 * QB + i * QB + j
    else:  # canonical: byte c holds k = 4c + i
        k = blk * 4 * QB + 4 * j + i
    valid = (rows[:, None, None] < N) & (k < K)
    w = tl.load(W + rows[:, None, None].to(tl.int64) * stride_w + k, mask=valid, other=0.0).to(tl.float32)
    if SCHEME == 0:
        # The reference's clamp(round(fl(w / s)), -1, 1) without dividing: trit = sign(w) where
        # |w| > s/2, else 0. Exact for fp32 w and s: s/2 is exact, and |w| > s/2 means |w| >= s/2
        # + ulp(s/2), so |w / s| >= 1/2 + 2^-24 / m (m in [1, 2): the mantissa of s/2), beyond
        # 1/2 + 2^-25, the midpoint that rounds (ties to even) down to 0.5; fl(|w / s|) is then
        # above 0.5 and rounds to 1 or more. |w| = s/2 gives 0.5, a tie to 0. NaN compares false:
        # trit 0, as the reference's nan_to_num. (No IEEE division and rounding per weight.)
        half = s * 0.5
        t = (w > half).to(tl.float32) - (w < -half).to(tl.float32)
    else:
        t = tl.where(w >= 0, 1.0, -1.0)
    t = tl.where(valid, t, 0.0).to(tl.int32)  # K padding is the zero trit
    if KBLOCKED:  # "nibbles" (bitcompile.numerics.packing): the trits of quarters 2h, 2h + 1 at position 4w + n
        # are one pair code (even digit + 3 x odd digit) at bit 16h + 4n of word w.
        # [BN, h, q, w, b, n % 2]: i = 2h + q, j = 4w + 2b + n % 2
        d = tl.reshape(pair_digits(t + 1) & 3, (BN, 2, 2, QB // 4, 2, 2))
        q = tl.arange(0, 2)[None, None, :, None, None, None]
        nl = tl.arange(0, 2)[None, None, None, None, None, :]
        packed = tl.sum(tl.sum((d * (1 + 2 * q)) << (4 * nl), axis=5), axis=2)  # [BN, h, w, b]: byte 4w + 2h + b
        packed = tl.reshape(tl.permute(packed, (0, 2, 1, 3)), (BN, QB))
    else:
        packed = tl.sum((t + 1) << (2 * i), axis=1)
    c = blk * QB + tl.arange(0, QB)
    tl.store(
        P + rows[:, None].to(tl.int64) * stride_p + c[None, :],
        packed.to(tl.uint8),
        mask=(rows[:, None] < N) & (c[None, :] < KB),
    )


@triton.jit
def _pack_kernel(
    W,
    ROWSUM,
    PART,
    SCALE,
    P,
    P2,
    N,
    K,
    KB,
    KB2,
    n_part,
    count,
    stride_w,
    stride_p,
    stride_p2,
    BN: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    SCHEME: tl.constexpr,
    LAYOUT: tl.constexpr,
    QB: tl.constexpr,
    PARTS: tl.constexpr,
):
    # LAYOUT: 0 canonical to P, 1 K-blocked to P, 2 both (canonical to P, K-blocked to P2).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    blk = tl.program_id(1)
    if PER_CHANNEL:
        s = tl.maximum(tl.math.div_rn(tl.load(ROWSUM + rows, mask=rows < N, other=1.0), K * 1.0), SCALE_MIN)
        if blk == 0:
            tl.store(SCALE + rows, s, mask=rows < N)
        s = s[:, None, None]
    else:
        parts = tl.arange(0, PARTS)
        total = tl.sum(tl.load(PART + parts, mask=parts < n_part, other=0.0), axis=0)
        # `count` arrives as fp32 from Triton's launcher but as fp64 from Inductor's (triton_op).
        s = tl.maximum(tl.math.div_rn(total, tl.cast(count, tl.float32)), SCALE_MIN)
        if (blk == 0) & (tl.program_id(0) == 0):
            tl.store(SCALE, s)
    _pack_tile(W, P, rows, blk, s, N, K, KB, stride_w, stride_p, BN, SCHEME, LAYOUT == 1, QB)
    if LAYOUT == 2:  # the same tile again (from L1/L2), placed for the other layout
        _pack_tile(W, P2, rows, blk, s, N, K, KB2, stride_w, stride_p2, BN, SCHEME, True, QB)


def quantize_pack(
    w: torch.Tensor,
    scheme: str = "ternary",
    per_channel: bool = False,
    layout: str = "canonical",
    wrap: Optional[Callable] = None,
):
    """``W [N, K] float -> (packed uint8 [N, ceil(K/4)] (canonical) or [N, kblocked_columns(K)],
    fp32 scale [N] | [1])``. ``wrap``: launched through ``torch.library.wrap_triton``
    (``tuning.traceable``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    (packed,), scale = _quantize_pack(w, scheme, per_channel, (layout,), wrap)
    return packed, scale


def quantize_pack_both(
    w: torch.Tensor, scheme: str = "ternary", per_channel: bool = False, wrap: Optional[Callable] = None
):
    """``W -> (canonical packed, scale, K-blocked packed)``: :func:`quantize_pack`'s two layouts
    from one launch of the pack kernel."""
    (canonical, blocked), scale = _quantize_pack(w, scheme, per_channel, ("canonical", "kblocked"), wrap)
    return canonical, scale, blocked


def _quantize_pack(w: torch.Tensor, scheme: str, per_channel: bool, layouts: tuple, wrap: Optional[Callable]):
    if scheme not in SCHEMES:
        raise ValueError(f"the weight-pack kernel supports {', '.join(SCHEMES)} (got {scheme!r})")
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape
    columns = [(k + 3) // 4 if layout == "canonical" else kblocked_columns(k) for layout in layouts]
    row_sum = torch.empty(n, device=w.device, dtype=torch.float32)
    scale = torch.empty(n if per_channel else 1, device=w.device, dtype=torch.float32)
    packed = [torch.empty((n, kb), device=w.device, dtype=torch.uint8) for kb in columns]
    if n == 0 or k == 0:
        scale.fill_(EPS)
        return [p.fill_(85) for p in packed], scale
    layout = 2 if len(layouts) == 2 else LAYOUTS[layouts[0]]
    flags = dict(PER_CHANNEL=per_channel, SCHEME=SCHEMES[scheme], LAYOUT=layout, QB=Q, PARTS=MAX_PARTS)
    first, second = packed[0], packed[-1]

    def launch(cfg):
        n_part = min(triton.cdiv(n, cfg["sum_rows"]), MAX_PARTS)
        part = torch.empty(n_part, device=w.device, dtype=torch.float32)
        tuning.traceable(_abs_sum_kernel, wrap)[(n_part,)](
            w, row_sum, part, n, k, w.stride(0), BN=cfg["sum_rows"], BK=cfg["sum_cols"], num_warps=cfg["sum_warps"]
        )
        return tuning.traceable(_pack_kernel, wrap)[(triton.cdiv(n, cfg["BN"]), triton.cdiv(k, 4 * Q))](
            w,
            row_sum,
            part,
            scale,
            first,
            second,
            n,
            k,
            first.shape[1],
            second.shape[1],
            n_part,
            float(n * k),
            w.stride(0),
            first.stride(0),
            second.stride(0),
            BN=cfg["BN"],
            num_warps=cfg["num_warps"],
            **flags,
        )

    # Both layouts share the canonical entries: the same tiles, stored twice.
    key, configs = (n, k, str(w.dtype), per_channel, layouts[0]), _configs()
    tuning.tune_before_tracing(
        wrap,
        "weight_pack",
        key,
        configs,
        lambda: _quantize_pack(torch.randn(n, k, device=w.device, dtype=w.dtype), scheme, per_channel, layouts, None),
    )
    cfg = tuning.choose("weight_pack", key, configs, launch)
    compiled = launch(cfg)
    tuning.dump_source(_pack_kernel, compiled, {**flags, **cfg, "w": str(w.dtype)})
    return packed, scale


def _configs():
    if tuning.interpreting():
        return [dict(sum_rows=4, sum_cols=32, sum_warps=4, BN=4, num_warps=4)]
    return [
        dict(sum_rows=sr, sum_cols=sc, sum_warps=sw, BN=bn, num_warps=w)
        for sr, sc, sw, bn, w in [
            (16, 512, 4, 8, 4),
            (4, 1024, 4, 8, 4),
            (8, 2048, 8, 16, 4),
            (32, 256, 8, 32, 8),
            (2, 2048, 4, 4, 4),
            (16, 512, 4, 64, 8),
        ]
    ]
