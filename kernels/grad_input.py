"""QAT backward: ``grad_x = grad [M, N] @ (trits [N, K] * s_w)`` from the packed weights.

The trits are unpacked in registers per tile and multiplied by the scale in the
grad dtype, which is exactly the operand the reference builds (``trit * s_w`` cast
to the grad dtype), so only the fp32 accumulation order differs. No dequantized
copy of W is written to memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import grouped_tile, rows, unpack_trits


# Four trits (bytes of $2: -1, 0, 1) and the 16-bit scale bits of each ($3..$6) -> four 16-bit
# values (+-scale or 0) in $0 (elements 0, 1) and $1 (2, 3). Checked on the CPU by interpreting
# this text (tests/kernels/test_ptx.py).
SCALED_TRITS_PTX = tl.constexpr(
    "{ .reg .b32 s, w, m; "
    "prmt.b32 s, $2, 0, 0x9180; prmt.b32 w, $3, $4, 0x5410; "
    "and.b32 m, s, 0x00010001; mul.lo.u32 m, m, 0xFFFF; and.b32 w, w, m; and.b32 s, s, 0x80008000; or.b32 $0, w, s; "
    "prmt.b32 s, $2, 0, 0xB3A2; prmt.b32 w, $5, $6, 0x5410; "
    "and.b32 m, s, 0x00010001; mul.lo.u32 m, m, 0xFFFF; and.b32 w, w, m; and.b32 s, s, 0x80008000; or.b32 $1, w, s; }")


@triton.jit
def _scaled_trits(t, ws, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """``(t * ws).to(dtype)`` for int8 trits t and positive scales ws, i.e. +-``ws`` rounded to
    dtype, or 0. For 16-bit dtypes on the GPU by bit operations on 4 trits at a time: sign-extend
    each trit byte to a 16-bit lane (prmt), keep ``ws``'s bits where the trit is odd, put in the
    trit's sign. The float route costs an int-to-float conversion (quarter rate) and a multiply
    per element. (Unlike ``0 * ws``, a zero trit gives 0 even for a NaN or inf scale.)"""
    if USE_ASM and dtype != tl.float32:
        bits = tl.broadcast_to(ws.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF, t.shape)
        out = tl.inline_asm_elementwise(SCALED_TRITS_PTX, "=r,=r,r,r,r,r,r", [t, bits], dtype=tl.int16,
                                        is_pure=True, pack=4)
        return out.to(dtype, bitcast=True)
    else:
        return (t.to(tl.float32) * ws).to(dtype)


@triton.jit
def _grad_input_kernel(G, P, WS, OUT, M, N, K, KB, stride_g, stride_p, stride_o,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       PER_CHANNEL: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr, USE_ASM: tl.constexpr):
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_c = pid_k * (BK // 4) + tl.arange(0, BK // 4)
    offs_n = tl.arange(0, BN)
    # Rows past M and packed columns past KB read valid memory (their results are never
    # stored); weight rows past N are met by zero grads, so only the grad load may need a
    # mask (none when N is whole tiles): masks cost a select per element in the loop.
    g_rows = G + (offs_m % M)[:, None].to(tl.int64) * stride_g
    p_cols = P + (offs_c % KB)[None, :]
    if not PER_CHANNEL:
        ws = tl.load(WS)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + offs_n
        g = tl.load(g_rows + n[None, :], mask=(n[None, :] < N) | EVEN_N, other=0.0)
        p = tl.load(p_cols + (n % N)[:, None] * stride_p)
        if PER_CHANNEL:
            ws = tl.load(WS + n % N)[:, None]
        w = _scaled_trits(unpack_trits(p, BK // 4, BN, USE_ASM), ws, G.dtype.element_ty, USE_ASM)
        if IEEE:
            acc = tl.dot(g, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w, acc)
    tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_o + offs_k[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def _configs():
    if tuning.interpreting():
        return [dict(BM=16, BN=16, BK=32, GROUP_M=4, num_warps=4)]
    return [dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 64, 128, 8, 3), (128, 64, 256, 8, 3), (128, 32, 128, 4, 4),
                                     (64, 64, 128, 4, 4), (256, 64, 128, 8, 3), (128, 128, 128, 8, 3)]]


def _check_operands(grad: torch.Tensor, wq: torch.Tensor, k: int) -> None:
    if wq.dtype != torch.uint8:
        raise TypeError(f"grad_input kernel needs packed uint8 ternary weights, got {wq.dtype}")
    if grad.shape[-1] != wq.shape[0] or wq.shape[1] != (k + 3) // 4:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, packed {tuple(wq.shape)}, k={k}")


def grad_input(grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, k: int) -> torch.Tensor:
    """``grad [..., N] @ (unpack(wq) * w_scale)`` in ``grad.dtype`` (fp32 accumulation;
    fp32 grads use IEEE fp32 dot products, not TF32)."""
    _check_operands(grad, wq, k)
    n, kb = wq.shape
    lead = grad.shape[:-1]
    g = rows(grad, n)
    m = g.shape[0]
    out = torch.empty((m, k), device=grad.device, dtype=grad.dtype)
    if m == 0:
        return out.reshape(*lead, k)
    wq = wq.contiguous()
    ws = w_scale.contiguous()
    flags = dict(PER_CHANNEL=ws.numel() > 1, IEEE=grad.dtype == torch.float32, USE_ASM=not tuning.interpreting())

    def launch(cfg):
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(k, cfg["BK"]),)
        return _grad_input_kernel[grid](g, wq, ws, out, m, n, k, kb, g.stride(0), wq.stride(0), out.stride(0),
                                        EVEN_N=n % cfg["BN"] == 0, **flags, **cfg)

    cfg = tuning.choose("grad_input", (tuning.bucket(m), n, k, str(grad.dtype)), _configs(), launch)
    compiled = launch(cfg)
    tuning.dump_source(_grad_input_kernel, compiled, {**flags, **cfg, "grad": str(grad.dtype)})
    return out.reshape(*lead, k)


def grad_input_quantized(grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """``ops.reference.grad_input_quantized`` on the GPU: the per-row quantization of ``grad``
    (per-channel ``s_w`` folded in) is the activation-quantization kernel, and ``q @ W_int``
    is the forward matmul kernel on int8 tensor cores, fed ``W_int^T`` re-laid out from the
    packed weights (``layout.transposed_kblocked``, one pass over the packed bytes); its epilogue
    applies the scales."""
    from bitcompile.kernels.act_quant import norm_quant
    from bitcompile.kernels.layout import transposed_kblocked
    from bitcompile.config import check_bits
    from bitcompile.kernels.ternary_matmul import ternary_matmul
    from bitcompile.ops.reference import GRAD_EPS

    check_bits("grad_input_bits", bits, "exact STE input gradient")
    _check_operands(grad, wq, k)
    n = wq.shape[0]
    per_channel = w_scale.numel() > 1
    ws = w_scale.float().contiguous()
    q, s, _, _ = norm_quant(grad, bits, "none", ws if per_channel else None, qeps=GRAD_EPS)
    out_scale = torch.ones_like(ws[:1]) if per_channel else ws
    return ternary_matmul(q, transposed_kblocked(wq, k), n, s, out_scale, None, grad.dtype, layout="kblocked",
                          keep=False)
