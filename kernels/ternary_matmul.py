"""Packed-ternary matmul: int8 activations x canonical 2-bit weights, int32 accumulation.

Two kernels, chosen by the number of rows M:
  * ``_gemv_kernel`` (decode-sized M): one program per (row block of W, token); the
    packed bytes are streamed once per token, trits unpacked in registers and reduced
    with integer multiply-adds (no tensor cores; the op is bound by the weight bytes).
  * ``_gemm_kernel`` (larger M): tiles of int8 A and unpacked trits fed to the int8
    tensor cores (``tl.dot`` -> int32), grouped tile order for L2 reuse.
Both share one epilogue: ``acc * s_w * s_x (+ bias)``, an optional activation, an
optional residual add, and the cast to the output dtype, in that order (the order of
the reference, so the float results match it bit for bit on the same accumulators).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import ACTIVATIONS, apply_activation, unpack_trits

GEMV_MAX_M = 1  # measured on the H100: the BM=16 tensor-core GEMM already wins at M=16


@triton.jit
def _epilogue(acc, C, XS, WS, BIAS, RES, offs_m, offs_n, M, N, stride_cm, stride_rm,
              EPILOGUE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :]
    if EPILOGUE:
        if PER_CHANNEL:
            ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)[None, :]
        else:
            ws = tl.load(WS)
        xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)[:, None]
        y = acc.to(tl.float32) * ws
        y = y * xs
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y = apply_activation(y, ACTIVATION)
        if HAS_RES:
            r = tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
            y = y + r.to(tl.float32)
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _gemv_kernel(A, P, C, XS, WS, BIAS, RES, M, N, K, KB, stride_am, stride_pn, stride_cm, stride_rm,
                 BN: tl.constexpr, BKB: tl.constexpr,
                 EPILOGUE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_c = tl.arange(0, BKB)
    # 2-D partial sums, reduced across threads once at the end (not once per chunk).
    acc2 = tl.zeros((BN, BKB), dtype=tl.int32)
    a_row = A + m * stride_am
    for c0 in range(0, KB, BKB):
        c = c0 + offs_c
        # Out-of-range bytes read as 0x55 (four zero trits), out-of-range K as 0.
        p = tl.load(P + offs_n[:, None] * stride_pn + c[None, :],
                    mask=(offs_n[:, None] < N) & (c[None, :] < KB), other=85).to(tl.int32)
        for j in tl.static_range(4):
            x = tl.load(a_row + 4 * c + j, mask=4 * c + j < K, other=0).to(tl.int32)
            acc2 += (((p >> (2 * j)) & 3) - 1) * x[None, :]
    acc = tl.sum(acc2, axis=1)
    offs_m = m + tl.arange(0, 1)
    _epilogue(acc[None, :], C, XS, WS, BIAS, RES, offs_m, offs_n, M, N, stride_cm, stride_rm,
              EPILOGUE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_RES)


@triton.jit
def _gemm_kernel(A, P, C, XS, WS, BIAS, RES, M, N, K, KB, stride_am, stride_pn, stride_cm, stride_rm,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 EPILOGUE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_c = tl.arange(0, BK // 4)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        a = tl.load(A + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K), other=0)
        c = k0 // 4 + offs_c
        p = tl.load(P + offs_n[:, None] * stride_pn + c[None, :],
                    mask=(offs_n[:, None] < N) & (c[None, :] < KB), other=85)
        w = unpack_trits(p, BK // 4, BN)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    _epilogue(acc, C, XS, WS, BIAS, RES, offs_m, offs_n, M, N, stride_cm, stride_rm,
              EPILOGUE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_RES)


def _gemv_configs(n: int):
    if tuning.interpreting():
        return [dict(BN=16, BKB=16, num_warps=4)]
    return [dict(BN=bn, BKB=bkb, num_warps=w, num_stages=s)
            for bn, bkb, w, s in [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 128, 4, 4),
                                  (8, 1024, 8, 3), (32, 128, 8, 3), (4, 1024, 4, 3)]]


def _gemm_configs(m: int):
    if tuning.interpreting():
        return [dict(BM=16, BN=16, BK=64, GROUP_M=4, num_warps=4)]
    shapes = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 256, 8, 3),
              (64, 128, 128, 4, 4), (64, 64, 256, 4, 4), (128, 64, 128, 4, 4)]
    if m <= 64:
        shapes = [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 4), (32, 128, 256, 4, 4),
                  (64, 64, 256, 4, 4), (16, 32, 512, 4, 4), (32, 32, 512, 4, 4)]
    return [dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


def ternary_matmul(a: torch.Tensor, wq: torch.Tensor, k: int, x_scale: Optional[torch.Tensor] = None,
                   w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   out_dtype: torch.dtype = torch.int32, activation: str = "none",
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a int8 [..., K] @ trits(wq)^T``. Without scales: the exact int32 accumulator.
    With ``x_scale [..., 1]`` and ``w_scale [N] | [1]``: the dequantized ``out_dtype`` output
    with bias, ``activation`` and ``residual [..., N]`` fused."""
    if a.dtype != torch.int8 or wq.dtype != torch.uint8:
        raise TypeError(f"ternary_matmul needs int8 activations and uint8 packed weights, got {a.dtype}, {wq.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    n, kb = wq.shape
    if kb != (k + 3) // 4 or a.shape[-1] != k:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, packed {tuple(wq.shape)}, k={k}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k).contiguous()
    m = a2.shape[0]
    wq = wq.contiguous()
    epilogue = w_scale is not None
    c = torch.empty((m, n), device=a.device, dtype=out_dtype if epilogue else torch.int32)
    if m == 0 or n == 0:
        return c.reshape(*lead, n)
    xs = x_scale.reshape(-1).contiguous() if epilogue else c
    ws = w_scale.contiguous() if epilogue else c
    res = residual.reshape(m, n).contiguous() if residual is not None else c
    flags = dict(EPILOGUE=epilogue, PER_CHANNEL=epilogue and w_scale.numel() > 1, HAS_BIAS=bias is not None,
                 ACTIVATION=ACTIVATIONS[activation], HAS_RES=residual is not None)
    args = (a2, wq, c, xs, ws, bias if bias is not None else c, res, m, n, k, kb,
            a2.stride(0), wq.stride(0), c.stride(0), res.stride(0))

    if m <= GEMV_MAX_M:
        def launch(cfg):
            return _gemv_kernel[(triton.cdiv(n, cfg["BN"]), m)](*args, **flags, **cfg)
        kernel, cfg = _gemv_kernel, tuning.choose("ternary_gemv", (tuning.bucket(m), n, k), _gemv_configs(n), launch)
    else:
        def launch(cfg):
            grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
            return _gemm_kernel[grid](*args, **flags, **cfg)
        kernel, cfg = _gemm_kernel, tuning.choose("ternary_gemm", (tuning.bucket(m), n, k), _gemm_configs(m), launch)
    compiled = launch(cfg)
    tuning.dump_source(kernel, compiled, {**flags, **cfg, "out": str(c.dtype)})
    return c.reshape(*lead, n)
