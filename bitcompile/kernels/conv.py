"""Packed-ternary convolution as an implicit GEMM over channels-last activations (conv1d /
conv2d, any stride, padding, dilation and groups).

Rows are output positions ``(n, oh, ow)``, columns output channels. The reduction runs tap by
tap: each K step is one kernel position ``(r, s)`` and BK input channels, so its int8
activation tile is BM runs of BK contiguous bytes of the NHWC input (16-byte loads, no im2col
buffer; padding positions read as 0, which the per-sample quantization keeps exactly 0). The
weights come as :func:`conv_taps`: the canonical packed trits re-ordered ``(r, s, c)`` with each
tap's channels padded to a whole byte, unpacked in registers into the int8 tensor-core
``tl.dot`` (int32 accumulation). The epilogue applies ``s_w[c] * s_x[n] (+ bias[c])`` and
stores in the output's own strides (NCHW or channels-last), in the output dtype or as the exact
int32 accumulator without scales.

The per-sample quantizer (``bitcompile/kernels/sample_quant.py``) writes its integers channels-last
whatever the model's layout, so the conv reads them as they are; other int8 inputs cost one
transposing copy first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import unpack_trits
from bitcompile.kernels.layout import once
from bitcompile.numerics.packing import pack_ternary, unpack_ternary


@triton.jit
def _conv_kernel(
    X,
    P,
    C,
    XS,
    WS,
    BIAS,
    ROWS,
    CIN,
    H,
    W,
    OH,
    OW,
    CIN_G,
    COUT_G,
    PB,
    TAPB,
    CSTEPS,
    s_on,
    s_oc,
    s_oh,
    s_ow,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < ROWS
    n = rows // (OH * OW)
    oh = (rows % (OH * OW)) // OW
    ow = rows % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    cols = pid_n * BN + tl.arange(0, BN)  # output channel within the group
    co = g * COUT_G + cols
    col_ok = cols < COUT_G
    x_n = X + n.to(tl.int64) * H * W * CIN + g * CIN_G  # sample n, the group's first channel
    p_co = P + co[:, None].to(tl.int64) * PB
    ch = tl.arange(0, BK)
    kb = tl.arange(0, BK // 4)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    # One flat loop over (tap, channel block), so the pipeliner sees every step.
    for t in tl.range(0, KH * KW * CSTEPS, num_stages=STAGES):
        tap = t // CSTEPS
        c0 = (t - tap * CSTEPS) * BK
        ih = ih0 + (tap // KW) * dil_h
        iw = iw0 + (tap % KW) * dil_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cs = c0 + ch
        a = tl.load(
            x_n[:, None] + ((ih * W + iw) * CIN)[:, None] + cs[None, :],
            mask=ok[:, None] & (cs < CIN_G)[None, :],
            other=0,
        )
        byte = tl.load(
            p_co + tap * TAPB + c0 // 4 + kb[None, :], mask=col_ok[:, None] & (c0 + 4 * kb < CIN_G)[None, :], other=85
        )  # 85: four zero trits
        w = unpack_trits(byte, BK // 4, BN, USE_ASM)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    out_ptrs = C + (n.to(tl.int64) * s_on + oh * s_oh + ow * s_ow)[:, None] + co[None, :].to(tl.int64) * s_oc
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
        return [dict(BM=16, BN=16, BK=32, STAGES=1, num_warps=4)]
    return [
        dict(BM=bm, BN=bn, BK=bk, STAGES=st, num_warps=w)
        for bm, bn, bk, st, w in [
            (128, 64, 64, 3, 4),
            (128, 128, 64, 3, 8),
            (128, 128, 32, 4, 4),
            (64, 64, 64, 4, 4),
            (128, 256, 64, 3, 8),
            (256, 64, 64, 3, 8),
            (64, 128, 128, 3, 4),
            (64, 32, 64, 4, 4),
            (32, 32, 32, 4, 4),
        ]
    ]


def tap_bytes(cin_g: int) -> int:
    """Bytes of one kernel tap's trits per output channel in :func:`conv_taps`."""
    return (cin_g + 3) // 4


def _taps(wq: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    cout, cin_g, taps = weight_shape[0], weight_shape[1], 1
    for d in weight_shape[2:]:
        taps *= d
    trits = unpack_ternary(wq, cin_g * taps).reshape(cout, cin_g, taps).transpose(1, 2)
    padded = torch.nn.functional.pad(trits, (0, 4 * tap_bytes(cin_g) - cin_g))  # zero trits
    return pack_ternary(padded.reshape(cout, -1))


def conv_taps(wq: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """Canonical packed conv weights (``W.flatten(1)``: order ``(c, r, s)``) -> the kernel's
    ``uint8 [C_out, taps * tap_bytes(C_in / groups)]``: order ``(r, s, c)``, each tap's channels
    padded with zero trits to a whole byte. Once per packed tensor (``layout.once``)."""
    return once(wq, ("conv_taps", tuple(weight_shape)), lambda: _taps(wq, weight_shape))


def ternary_conv(
    xq: torch.Tensor,
    wq: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    x_scale: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.int32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """conv of int8 ``xq [N, C_in, *S]`` (1 or 2 spatial dims, any layout) with the trits packed in
    ``wq [C_out, ceil(K/4)]``. Without scales: the exact int32 accumulator; with ``x_scale [N, 1,
    ...]`` and ``w_scale [C_out] | [1]``: dequantized ``out_dtype``. The output is laid out as
    ``memory_format`` says (channels-last for 4-D only)."""
    spatial = xq.dim() - 2
    if xq.dtype != torch.int8 or wq.dtype != torch.uint8 or spatial not in (1, 2):
        raise ValueError(
            f"ternary_conv needs int8 [N, C, L] or [N, C, H, W] activations and uint8 packed "
            f"weights, got {xq.dtype} {tuple(xq.shape)}, {wq.dtype}"
        )
    if spatial == 1:  # conv1d as a conv2d of height 1
        y = ternary_conv(
            xq.unsqueeze(2),
            wq,
            (*weight_shape[:2], 1, weight_shape[2]),
            (1, stride[0]),
            (0, padding[0]),
            (1, dilation[0]),
            groups,
            None if x_scale is None else x_scale.unsqueeze(2),
            w_scale,
            bias,
            out_dtype,
        )
        return y.squeeze(2)
    cout, cin_g, kh, kw = weight_shape
    nb, cin, h, w = xq.shape
    kg = cin_g * kh * kw
    if cin != cin_g * groups or cout % groups or wq.shape != (cout, (kg + 3) // 4):
        raise ValueError(
            f"conv shapes do not agree: x {tuple(xq.shape)}, weight {tuple(weight_shape)}, "
            f"groups {groups}, packed {tuple(wq.shape)}"
        )
    if h * w * cin >= 2**31:
        raise ValueError(f"ternary_conv indexes one sample with int32: {h}x{w}x{cin} int8 is too large")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    epilogue = w_scale is not None
    out = torch.empty(
        (nb, cout, oh, ow), device=xq.device, dtype=out_dtype if epilogue else torch.int32, memory_format=memory_format
    )
    rows = nb * oh * ow
    if out.numel() == 0:
        return out
    x_nhwc = xq.permute(0, 2, 3, 1)
    if not x_nhwc.is_contiguous():  # the per-sample quantizer writes channels-last: no copy
        x_nhwc = x_nhwc.contiguous()
    taps = conv_taps(wq, weight_shape)
    xs = x_scale.reshape(-1).contiguous() if epilogue else out
    ws = w_scale.contiguous() if epilogue else out
    flags = dict(
        KH=kh,
        KW=kw,
        EPILOGUE=epilogue,
        PER_CHANNEL=epilogue and w_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        USE_ASM=not tuning.interpreting(),
    )
    cout_g = cout // groups

    def launch(cfg):
        cfg = dict(cfg)
        grid = (triton.cdiv(rows, cfg["BM"]), triton.cdiv(cout_g, cfg["BN"]), groups)
        return _conv_kernel[grid](
            x_nhwc,
            taps,
            out,
            xs,
            ws,
            bias if bias is not None else out,
            rows,
            cin,
            h,
            w,
            oh,
            ow,
            cin_g,
            cout_g,
            taps.shape[1],
            tap_bytes(cin_g),
            triton.cdiv(cin_g, cfg["BK"]),
            *out.stride(),
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            **flags,
            **cfg,
        )

    cfg = tuning.choose("conv_nhwc", (tuning.bucket(rows), cout_g, cin_g, kh, kw), _configs(), launch)
    tuning.dump_source(_conv_kernel, launch(cfg), {**flags, **cfg, "out": str(out.dtype)})
    return out
