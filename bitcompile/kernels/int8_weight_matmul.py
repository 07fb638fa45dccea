"""Weight-only int8 matmul: float activations times int8 weights, the dequantize fused.

    y[m, n] = (sum_k x[m, k] * W[n, k]) * s[n] (+ bias[n])      float32, cast to the output dtype

``s`` is one scale per output row or one for the tensor. This is the path of linears kept out of
the ternary scheme but not out of quantization (an ``lm_head`` deployed with int8 weights,
``W8A16Linear``, ``weight="int8"`` without activation quantization): at decode the step reads
their weights once per token, and int8 halves what a 16-bit weight costs to read.

Two kernels, the same arithmetic (int8 codes convert exactly to any float type: |v| <= 127):
  * ``_gemv_kernel`` (one row: batch-1 decode, a prefill's last position): CUDA cores. A program
    owns BN weight rows and walks K in BK-wide slices, reading each weight once.
  * ``_gemm_kernel`` (two rows and more; 16-row tiles for decode batches): tensor cores, ``tl.dot``
    of the activation tile with the weight tile converted to the activation's 16-bit type (exact
    products, float32 accumulation); float32 activations multiply at full precision
    (``input_precision="ieee"``), as the reference does.
The launch configuration comes from the tuning table (``int8w_mm`` keys), a heuristic where the
shape is not tabled.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import rows


@triton.jit
def _epilogue(acc, S, BIAS, C, offs_m, offs_n, M, N, stride_cm, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``acc [BM, BN] * s (+ bias)`` in float32 (the reference's order), stored as C's type."""
    n_mask = offs_n < N
    if PER_CHANNEL:
        y = acc * tl.load(S + offs_n, mask=n_mask, other=0.0)[None, :]
    else:
        y = acc * tl.load(S)
    if HAS_BIAS:
        y = y + tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(ptrs, y.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _gemv_kernel(
    X,
    W,
    S,
    BIAS,
    C,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_rows = W + (offs_n % N).to(tl.int64)[:, None] * stride_wn  # rows past N read a valid row, never stored
    # x is loaded at the weight tile's shape (the pointer broadcast over rows; L1 serves the
    # repeats): a [BK] load would be moved into the tile's layout through shared memory, with
    # barriers, every step. Products accumulate elementwise in [BN, BK] and are summed over K once,
    # after the loop (a sum per slice would shuffle across threads every step). The next slice's
    # weights are requested before this slice's arithmetic: a load is in flight while it computes.
    x_row = X + 0 * offs_n[:, None]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    w = tl.load(w_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0, eviction_policy="evict_first")
    for k0 in range(0, K, BK):
        k = k0 + offs_k
        k_next = k + BK
        w_next = tl.load(w_rows + k_next[None, :], mask=k_next[None, :] < K, other=0, eviction_policy="evict_first")
        x = tl.load(x_row + k[None, :], mask=k[None, :] < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
        w = w_next
    out = tl.sum(acc, axis=1)[None, :]
    _epilogue(out, S, BIAS, C, tl.arange(0, 1), offs_n, M, N, stride_cm, PER_CHANNEL, HAS_BIAS)


@triton.jit
def _gemm_kernel(
    X,
    W,
    S,
    BIAS,
    C,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    w_rows = W + (offs_n % N).to(tl.int64)[None, :] * stride_wn
    x_rows = X + (offs_m % M).to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=k[None, :] < K, other=0.0)
        w = tl.load(w_rows + k[:, None], mask=k[:, None] < K, other=0)  # [BK, BN]: W^T's tile
        if IEEE:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    _epilogue(acc, S, BIAS, C, offs_m, offs_n, M, N, stride_cm, PER_CHANNEL, HAS_BIAS)


def candidates(m: int) -> list[dict]:
    """Launch configurations for ``m`` rows, the heuristic first (``tuning.choose``)."""
    if m == 1:  # BN x BK float32 accumulators: 32 or 64 per thread (the next slice's weights as many bytes)
        tiles = ((16, 256, 4), (8, 512, 4), (32, 128, 4), (4, 1024, 4), (16, 512, 4), (32, 256, 8), (8, 256, 2))
        return [dict(GEMV=True, BN=bn, BK=bk, num_warps=w, num_stages=1) for bn, bk, w in tiles]
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    tiles = ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 5), (32, 256, 4, 4))
    if bm > 16:
        tiles = ((128, 64, 8, 3), (64, 128, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4))
    return [dict(GEMV=False, BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s) for bn, bk, w, s in tiles]


def int8_weight_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``(x [..., K] @ W^T) * w_scale (+ bias)`` for int8 ``W [N, K]``, float ``x`` and float32
    ``w_scale`` of ``[N]`` or ``[1]``, in ``out_dtype`` (default ``x.dtype``)."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise TypeError(f"int8_weight_matmul needs int8 weights [N, K], got {w.dtype} {tuple(w.shape)}")
    if not x.is_floating_point() or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"int8_weight_matmul needs float activations [..., {w.shape[1]}], got {x.dtype} {tuple(x.shape)}"
        )
    n, k = w.shape
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must hold 1 or {n} scales, got {w_scale.numel()}")
    lead = x.shape[:-1]
    m = x.numel() // k if k else lead.numel()
    c = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if k == 0:  # an empty sum: the bias alone
        return c.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(c)).reshape(*lead, n)
    if m == 0 or n == 0:
        return c.reshape(*lead, n)
    x2 = rows(x, k)
    w = w if w.stride(-1) == 1 else w.contiguous()
    scale = w_scale.float().reshape(-1).contiguous()
    b = bias.contiguous() if bias is not None else scale  # (unread without HAS_BIAS)
    args = (x2, w, scale, b, c, m, n, k, x2.stride(0), w.stride(0), c.stride(0))
    flags = dict(PER_CHANNEL=scale.numel() > 1, HAS_BIAS=bias is not None)

    def launch(cfg: dict) -> None:
        cfg = dict(cfg)
        if cfg.pop("GEMV"):
            _gemv_kernel[(triton.cdiv(n, cfg["BN"]),)](*args, **cfg, **flags)
        else:
            grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(m, cfg["BM"]))
            _gemm_kernel[grid](*args, **cfg, **flags, IEEE=x2.dtype == torch.float32)

    options = candidates(m)
    chosen = tuning.choose("int8w_mm", (tuning.bucket(m), n, k, str(x2.dtype)), options, launch)
    # A cached entry that is no candidate here (tuned by another version: the GEMV takes one row)
    # would compute the wrong rows: the heuristic instead.
    launch(chosen if chosen in options else options[0])
    return c.reshape(*lead, n)
