"""Packed-ternary convolution as an implicit GEMM (conv1d / conv2d, any stride, padding,
dilation and groups).

Rows are output positions ``(n, oh, ow)``, columns output channels, and the reduction
runs over ``K = C_in / groups * KH * KW`` in ``W.flatten(1)`` order ``(c, r, s)``: the
order the canonical packed weights of the conv pass are in. No im2col buffer is built:
each K step gathers its int8 activation tile straight from ``x`` (padding positions
read as 0, which the per-sample quantization keeps exactly 0), unpacks the matching
trits from the packed bytes in registers, and feeds an int8 tensor-core ``tl.dot`` with
int32 accumulation. The epilogue applies ``s_w[c] * s_x[n] (+ bias[c])`` and stores NCHW
in the output dtype (or the exact int32 accumulator without scales).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning


@triton.jit
def _conv_kernel(X, P, C, XS, WS, BIAS, ROWS, CIN, H, W, OH, OW, KG, PB, CIN_G, COUT_G,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 EPILOGUE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    n = rows // (OH * OW)
    oh = (rows % (OH * OW)) // OW
    ow = rows % OW
    cols = pid_n * BN + tl.arange(0, BN)  # output channel within the group
    co = g * COUT_G + cols
    row_ok = rows < ROWS
    col_ok = cols < COUT_G
    x_base = X + n.to(tl.int64) * CIN * H * W + (g * CIN_G).to(tl.int64) * H * W
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, KG, BK):
        ks = k0 + tl.arange(0, BK)
        c = ks // (KH * KW)
        r = (ks % (KH * KW)) // KW
        s = ks % KW
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        ok = row_ok[:, None] & (ks < KG)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + c[None, :] * H * W + ih * W + iw, mask=ok, other=0)
        byte = tl.load(P + co[:, None].to(tl.int64) * PB + ks[None, :] // 4,
                       mask=col_ok[:, None] & (ks < KG)[None, :], other=85)  # 85: four zero trits
        w = ((byte.to(tl.int32) >> (2 * (ks % 4))[None, :]) & 3).to(tl.int8) - 1
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    out_ptrs = C + (n.to(tl.int64) * (COUT_G * tl.num_programs(2)) * OH * OW + oh * OW + ow)[:, None] \
        + co[None, :].to(tl.int64) * OH * OW
    mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE:
        if PER_CHANNEL:
            ws = tl.load(WS + co, mask=col_ok, other=0.0)[None, :]
        else:
            ws = tl.load(WS)
        y = acc.to(tl.float32) * ws
        y = y * tl.load(XS + n, mask=row_ok, other=0.0)[:, None]
        if HAS_BIAS:
            y = y + tl.load(BIAS + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


def _configs():
    if tuning.interpreting():
        return [dict(BM=16, BN=16, BK=32, num_warps=4)]
    return [dict(BM=bm, BN=bn, BK=bk, num_warps=w) for bm, bn, bk, w in
            [(64, 64, 32, 4), (128, 64, 32, 4), (64, 32, 64, 4), (128, 128, 32, 8), (32, 32, 64, 4)]]


def ternary_conv(xq: torch.Tensor, wq: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int,
                 x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """conv of int8 ``xq [N, C_in, *S]`` (1 or 2 spatial dims) with the trits packed in
    ``wq [C_out, ceil(K/4)]``. Without scales: the exact int32 accumulator; with
    ``x_scale [N, 1, ...]`` and ``w_scale [C_out] | [1]``: dequantized ``out_dtype``."""
    spatial = xq.dim() - 2
    if xq.dtype != torch.int8 or wq.dtype != torch.uint8 or spatial not in (1, 2):
        raise ValueError(f"ternary_conv needs int8 [N, C, L] or [N, C, H, W] activations and uint8 packed "
                         f"weights, got {xq.dtype} {tuple(xq.shape)}, {wq.dtype}")
    if spatial == 1:  # conv1d as a conv2d of height 1
        y = ternary_conv(xq.unsqueeze(2), wq, (*weight_shape[:2], 1, weight_shape[2]), (1, stride[0]),
                         (0, padding[0]), (1, dilation[0]), groups, None if x_scale is None else x_scale.unsqueeze(2),
                         w_scale, bias, out_dtype)
        return y.squeeze(2)
    cout, cin_g, kh, kw = weight_shape
    nb, cin, h, w = xq.shape
    kg = cin_g * kh * kw
    if cin != cin_g * groups or cout % groups or wq.shape != (cout, (kg + 3) // 4):
        raise ValueError(f"conv shapes do not agree: x {tuple(xq.shape)}, weight {tuple(weight_shape)}, "
                         f"groups {groups}, packed {tuple(wq.shape)}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    epilogue = w_scale is not None
    out = torch.empty((nb, cout, oh, ow), device=xq.device, dtype=out_dtype if epilogue else torch.int32)
    rows = nb * oh * ow
    if out.numel() == 0:
        return out
    xq, wq = xq.contiguous(), wq.contiguous()
    xs = x_scale.reshape(-1).contiguous() if epilogue else out
    ws = w_scale.contiguous() if epilogue else out
    flags = dict(KH=kh, KW=kw, EPILOGUE=epilogue, PER_CHANNEL=epilogue and w_scale.numel() > 1,
                 HAS_BIAS=bias is not None)
    cout_g = cout // groups

    def launch(cfg):
        cfg = dict(cfg)
        grid = (triton.cdiv(rows, cfg["BM"]), triton.cdiv(cout_g, cfg["BN"]), groups)
        return _conv_kernel[grid](xq, wq, out, xs, ws, bias if bias is not None else out, rows, cin, h, w, oh, ow,
                                  kg, wq.shape[1], cin_g, cout_g, stride[0], stride[1], padding[0], padding[1],
                                  dilation[0], dilation[1], **flags, **cfg)

    cfg = tuning.choose("ternary_conv", (tuning.bucket(rows), cout_g, kg, kh, kw), _configs(), launch)
    tuning.dump_source(_conv_kernel, launch(cfg), {**flags, **cfg, "out": str(out.dtype)})
    return out
