"""QAT backward: ``grad_x = grad [M, N] @ (trits [N, K] * s_w)`` from the packed weights.

The trits are unpacked in registers per tile, never as a dequantized copy of W in memory.
The reference's operand is ``trit * s_w`` cast to the grad dtype; the kernels use it as is,
or (16-bit grads) multiply the sum by the rounded scale instead, which changes nothing but
rounding since each 16-bit product is exact in fp32: only the fp32 accumulation's rounding
differs from the reference. Three kernels, chosen by tuning:
  * ``_grad_input_kernel`` reads the canonical bytes (packed along K, the output axis):
    the scaled trits are the MMA's shared-memory operand, stored there every step, and
    the tensor cores are waited on before each store.
  * ``_grad_input_t_kernel`` (16-bit grads, one weight scale) reads
    ``layout.transposed_kblocked(W)`` (packed along N, the reduction axis; one relayout
    pass per call, included in the tuning's timing) and computes the transposed tile
    ``trits^T @ grad^T``, then scales it: the trits (+-1.0 / 0) are the MMA's register
    operand, never stored to shared memory, as in the forward's SWAP.
  * on sm_90, ``grad_input_ws`` (Gluon, warp-specialised: decode warps feed MMA warps; same
    operands, same sums as the transposed kernel). Inductor's generated code launches Triton
    kernels only, so a traced call reaches it through an opaque op (``gluon_op``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import grad_input_ws, tuning
from bitcompile.kernels.common import ONE_TABLES, grouped_tile, rows, unpack_trits
from bitcompile.kernels.layout import QUARTER, transposed_kblocked
from bitcompile.numerics.spec import GRAD_EPS, check_bits

# Four trits (bytes of $2: -1, 0, 1) and the 16-bit scale bits of each ($3..$6) -> four 16-bit
# values (+-scale or 0) in $0 (elements 0, 1) and $1 (2, 3). Checked on the CPU by interpreting
# this text (tests/kernels/test_grad_input.py).
SCALED_TRITS_PTX = tl.constexpr(
    "{ .reg .b32 s, w, m; "
    "prmt.b32 s, $2, 0, 0x9180; prmt.b32 w, $3, $4, 0x5410; "
    "and.b32 m, s, 0x00010001; mul.lo.u32 m, m, 0xFFFF; and.b32 w, w, m; and.b32 s, s, 0x80008000; or.b32 $0, w, s; "
    "prmt.b32 s, $2, 0, 0xB3A2; prmt.b32 w, $5, $6, 0x5410; "
    "and.b32 m, s, 0x00010001; mul.lo.u32 m, m, 0xFFFF; and.b32 w, w, m; and.b32 s, s, 0x80008000; or.b32 $1, w, s; }"
)


@triton.jit
def _scaled_trits(t, ws, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """``(t * ws).to(dtype)`` for int8 trits t and positive scales ws, i.e. +-``ws`` rounded to
    dtype, or 0. For 16-bit dtypes on the GPU by bit operations on 4 trits at a time: sign-extend
    each trit byte to a 16-bit lane (prmt), keep ``ws``'s bits where the trit is odd, put in the
    trit's sign. The float route costs an int-to-float conversion (quarter rate) and a multiply
    per element. (Unlike ``0 * ws``, a zero trit gives 0 even for a NaN or inf scale.)"""
    if USE_ASM and dtype != tl.float32:
        bits = tl.broadcast_to(ws.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF, t.shape)
        out = tl.inline_asm_elementwise(
            SCALED_TRITS_PTX, "=r,=r,r,r,r,r,r", [t, bits], dtype=tl.int16, is_pure=True, pack=4
        )
        return out.to(dtype, bitcast=True)
    else:
        return (t.to(tl.float32) * ws).to(dtype)


@triton.jit
def _grad_input_kernel(
    G,
    P,
    WS,
    OUT,
    M,
    N,
    K,
    KB,
    stride_g,
    stride_p,
    stride_o,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_N: tl.constexpr,
    USE_ASM: tl.constexpr,
):
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
    tl.store(
        OUT + offs_m[:, None].to(tl.int64) * stride_o + offs_k[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


# Two trits (2-bit codes c = trit + 1 at bit $2 of bytes 0 and 1 of $1) -> two 16-bit values
# (-1, 0 or 1) in one register, by one byte permute: $3 = [L, 0, L, L] and $4 = [H^0x80, 0,
# H, H] are the low and high bytes of 1.0 by code, so the selector for lane e is (c_e, 4 + c_e).
# Checked on the CPU by interpreting this text (tests/kernels/test_grad_input.py).
TRIT_PAIR_PTX = tl.constexpr(
    "{ .reg .b32 t; shr.b32 t, $1, $2; and.b32 t, t, 0x0303; mad.lo.u32 t, t, 0x11, 0x4040; prmt.b32 $0, $3, $4, t; }"
)


@triton.jit
def _trit_pairs(
    p16, SHIFT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, dtype: tl.constexpr, USE_ASM: tl.constexpr
):
    """Packed byte pairs ``p16 [R, C]`` (int16) -> the 16-bit float bits of the trits at bit
    SHIFT of each byte, ``[R, C, 2]``; ``LO``/``HI``: the ``ONE_TABLES`` entry of ``dtype``.
    The pair axis stays within a thread, as in the 16-bit MMA register operand (two
    consecutive K per register), so the byte loads feed the MMA without a layout conversion
    (unpacking four trits per 32-bit register, or tables computed from the scale at run time,
    make Triton convert the trits' layout through shared memory every step)."""
    if USE_ASM:
        pair = tl.inline_asm_elementwise(
            TRIT_PAIR_PTX,
            "=r,r,r,r,r",
            [
                p16.to(tl.int32) & 0xFFFF,
                tl.full(p16.shape, SHIFT, tl.int32),
                tl.full(p16.shape, LO, tl.int32),
                tl.full(p16.shape, HI, tl.int32),
            ],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return tl.join((pair & 0xFFFF).to(tl.int16), (pair >> 16).to(tl.int16))
    else:
        t0 = (((p16 >> SHIFT) & 3) - 1).to(tl.float32)
        t1 = (((p16 >> (SHIFT + 8)) & 3) - 1).to(tl.float32)
        return tl.join(t0, t1).to(dtype).to(tl.int16, bitcast=True)


@triton.jit
def _grad_input_t_kernel(
    G,
    P,
    WS,
    OUT,
    M,
    N,
    K,
    NPB,
    stride_g,
    stride_p,
    stride_o,
    BK: tl.constexpr,
    BM: tl.constexpr,
    GROUP_K: tl.constexpr,
    Q: tl.constexpr,
    JOIN: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    EVEN_N: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    # P: transposed K-blocked bytes [K, NPB], read as int16 byte pairs: row k, block b, shift
    # i of byte j holds the trit of weight row n = 4 Q b + Q i + j. The tile is acc^T [BK, BM]
    # = trits^T [BK, 4Q] @ g^T, the trits (+-1.0 or 0 in the grad dtype) the MMA's register
    # operand; the one weight scale s (rounded to the grad dtype, as the reference's operand
    # trit * s is) multiplies the sum: g * (t * s) = (g * t) * s exactly in fp32, so only the
    # accumulation's rounding differs. Per-channel scales vary along N: the canonical kernel.
    pid_k, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(K, BK), tl.cdiv(M, BM), GROUP_K)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, Q)
    offs_b = tl.arange(0, 4 * Q)
    # Rows past K / M read valid rows (never stored); N past its end holds zero trits, and
    # the grad load is masked there (no mask at all when N is whole 4Q blocks).
    p_ptrs = P.to(tl.pointer_type(tl.int16)) + (
        (offs_k % K)[:, None].to(tl.int64) * (stride_p // 2) + tl.arange(0, Q // 2)[None, :]
    )
    g_rows = G + (offs_m % M)[:, None].to(tl.int64) * stride_g
    dtype = G.dtype.element_ty
    acc = tl.zeros((BK, BM), dtype=tl.float32)
    for nb in range(0, NPB, Q):
        p = tl.load(p_ptrs + nb // 2)
        if JOIN:  # one dot per 4Q block: the four shifted tiles side by side are its N order
            n = 4 * nb + offs_b
            g = tl.load(g_rows + n[None, :], mask=(n[None, :] < N) | EVEN_N, other=0.0)
            w = tl.join(
                tl.join(_trit_pairs(p, 0, LO, HI, dtype, USE_ASM), _trit_pairs(p, 2, LO, HI, dtype, USE_ASM)),
                tl.join(_trit_pairs(p, 4, LO, HI, dtype, USE_ASM), _trit_pairs(p, 6, LO, HI, dtype, USE_ASM)),
            )
            # w[k, h, e, y, x] is the trit of shift 2x + y, byte 2h + e: order (x, y, h, e) is N order
            w = tl.reshape(tl.permute(w, (0, 4, 3, 1, 2)), (BK, 4 * Q))
            acc = tl.dot(w.to(dtype, bitcast=True), tl.trans(g), acc)
        else:
            for i in tl.static_range(4):
                n = 4 * nb + i * Q + offs_j
                g = tl.load(g_rows + n[None, :], mask=(n[None, :] < N) | EVEN_N, other=0.0)
                w = tl.reshape(_trit_pairs(p, 2 * i, LO, HI, dtype, USE_ASM), (BK, Q))
                acc = tl.dot(w.to(dtype, bitcast=True), tl.trans(g), acc)
    acc = acc * tl.load(WS).to(dtype).to(tl.float32)
    out = tl.trans(acc)
    tl.store(
        OUT + offs_m[:, None].to(tl.int64) * stride_o + offs_k[None, :],
        out.to(OUT.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


# In a compiled graph the Gluon kernel is an opaque op whose call costs ~80-100 us of host time
# (BENCHMARKS.md rounds 21 and 28), where Inductor launches the Triton kernels from its own code
# for a few: below ~3e10 FLOPs (~80 us of an H100's dense bf16 throughput) a faster Gluon kernel
# cannot win that back, and small models' training steps are host-bound (hidden 384: 42 calls
# took 4.3 ms of a 24.5 ms step). Compiled graphs use the Triton kernels there (also under CUDA
# graphs, where the call's host cost is gone: the launcher traced here does not know the mode).
GLUON_TRACED_MIN_FLOPS = 1 << 35


def _configs(transposed_ok: bool = True, ws_ok: bool = False):
    """Launch candidates; ``transposed_ok``: the grads are 16-bit and the scale one number;
    ``ws_ok``: ``grad_input_ws.supports`` the operands."""
    if tuning.interpreting():
        canonical = [dict(BM=16, BN=16, BK=32, GROUP_M=4, num_warps=4)]
        return (
            canonical
            + [dict(layout="transposed", BK=16, BM=16, JOIN=jn, GROUP_K=4, num_warps=4) for jn in (False, True)]
            * transposed_ok
        )
    canonical = [
        dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 64, 128, 8, 3),
            (128, 64, 256, 8, 3),
            (128, 32, 128, 4, 4),
            (64, 64, 128, 4, 4),
            (256, 64, 128, 8, 3),
            (128, 128, 128, 8, 3),
        ]
    ]
    # (BK, BM, JOIN, warps, stages). With one warpgroup (4 warps) ptxas keeps the MMAs of a dot in
    # flight; with two it serialises them (C7515 on Triton 3.9's sm_90 code). On the H100
    # (docs/kernels.md) (128, 64, 4, 3) wins at both QAT shapes: two programs per SM overlap one's
    # unpacking with the other's MMAs; 2-stage or BM=32 tiles (more programs per SM) are slower.
    transposed = [
        dict(layout="transposed", BK=bk, BM=bm, JOIN=jn, GROUP_K=8, num_warps=w, num_stages=s)
        for bk, bm, jn, w, s in [
            (128, 64, False, 4, 3),
            (128, 64, False, 4, 2),
            (128, 128, False, 8, 3),
            (128, 128, True, 8, 2),
        ]
    ]
    return canonical + transposed * transposed_ok + [dict(layout="ws", **c) for c in grad_input_ws.CONFIGS] * ws_ok


def _check_operands(grad: torch.Tensor, wq: torch.Tensor, k: int) -> None:
    if wq.dtype != torch.uint8:
        raise TypeError(f"grad_input kernel needs packed uint8 ternary weights, got {wq.dtype}")
    if grad.shape[-1] != wq.shape[0] or wq.shape[1] != (k + 3) // 4:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, packed {tuple(wq.shape)}, k={k}")


def grad_input(
    grad: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    k: int,
    config: Optional[dict] = None,
    wrap: Optional[Callable] = None,
    gluon_op: Optional[Callable] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``grad [..., N] @ (unpack(wq) * w_scale)`` in ``out_dtype`` (default ``grad.dtype``; fp32
    accumulation; fp32 grads use IEEE fp32 dot products, not TF32, on CUDA cores: callers that
    want tensor cores pass 16-bit grads with ``out_dtype=torch.float32``). ``config``: one of
    ``_configs()`` instead of the tuned choice (tests run each kernel this way). ``wrap``:
    launched through ``torch.library.wrap_triton`` (``tuning.traceable``); the Gluon kernel then
    through ``gluon_op(g, wq, w_scale, k, tile, out_dtype)`` (``bitnet::grad_input_ws``)."""
    _check_operands(grad, wq, k)
    n, kb = wq.shape
    lead = grad.shape[:-1]
    g = rows(grad, n)
    m = g.shape[0]
    out_dtype = out_dtype or grad.dtype
    out = torch.empty((m, k), device=grad.device, dtype=out_dtype)
    if m == 0:
        return out.reshape(*lead, k)
    wq = wq.contiguous()
    ws = w_scale.contiguous()
    per_channel = ws.numel() > 1
    transposed_ok = not per_channel and grad.dtype in (torch.bfloat16, torch.float16)
    traced_ws_ok = gluon_op is not None and 2 * m * n * k >= GLUON_TRACED_MIN_FLOPS
    ws_ok = (wrap is None or traced_ws_ok) and grad_input_ws.supports(grad, wq, ws)
    use_asm = not tuning.interpreting()

    def launch(cfg):
        cfg = dict(cfg)
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(k, cfg["BK"]),)
        layout = cfg.pop("layout", "canonical")
        if layout == "ws":  # eager only (traced: gluon_op, below)
            if not ws_ok:
                grad_input_ws.require(grad, wq, ws)
            return grad_input_ws.launch(g, wq, ws, out, **cfg)
        if layout == "transposed":
            if not transposed_ok:
                raise ValueError(
                    "the transposed grad_input kernel takes 16-bit grads and a per-tensor weight scale, "
                    f"got {grad.dtype} and {ws.numel()} scales"
                )
            pt = transposed_kblocked(wq, k, wrap, order="fields")
            lo, hi = ONE_TABLES["bf16" if grad.dtype == torch.bfloat16 else "fp16"]
            kernel = tuning.traceable(_grad_input_t_kernel, wrap)
            return kernel[grid](
                g,
                pt,
                ws,
                out,
                m,
                n,
                k,
                pt.shape[1],
                g.stride(0),
                pt.stride(0),
                out.stride(0),
                Q=QUARTER,
                LO=lo,
                HI=hi,
                EVEN_N=n % (4 * QUARTER) == 0,
                USE_ASM=use_asm,
                **cfg,
            )
        kernel = tuning.traceable(_grad_input_kernel, wrap)
        return kernel[grid](
            g,
            wq,
            ws,
            out,
            m,
            n,
            k,
            kb,
            g.stride(0),
            wq.stride(0),
            out.stride(0),
            PER_CHANNEL=per_channel,
            IEEE=grad.dtype == torch.float32,
            EVEN_N=n % cfg["BN"] == 0,
            USE_ASM=use_asm,
            **cfg,
        )

    candidates = [config] if config is not None else _configs(transposed_ok, ws_ok)
    if tuning.interpreting() and config is None:  # no timing here: spread the CPU tests' shapes over both kernels
        candidates = [candidates[(m + n) % len(candidates)]]
    # Per-channel scales have their own entries (only the canonical kernel takes them).
    key = (tuning.bucket(m), n, k, str(grad.dtype)) + (("per_channel",) if per_channel else ())

    def tune():
        grad_input(
            torch.randn(m, n, device=grad.device, dtype=grad.dtype),
            torch.randint(0, 256, tuple(wq.shape), device=grad.device, dtype=torch.uint8),
            torch.rand(tuple(ws.shape), device=grad.device),
            k,
            config,
            out_dtype=out_dtype,
        )

    tuning.tune_before_tracing(wrap, "grad_input", key, candidates, tune)
    cfg = tuning.choose("grad_input", key, candidates, launch)
    if cfg.get("layout") == "ws" and not ws_ok and config is None:
        # A table entry for the Gluon kernel where it cannot run (a Triton without Gluon, a traced
        # call without gluon_op): the best of the Triton kernels, under a key of its own.
        key, candidates = key + ("triton",), _configs(transposed_ok)
        tuning.tune_before_tracing(wrap, "grad_input", key, candidates, tune)
        cfg = tuning.choose("grad_input", key, candidates, launch)
    layout = cfg.get("layout", "canonical")
    if layout == "ws" and wrap is not None:
        return gluon_op(g, wq, ws, k, [cfg[name] for name in grad_input_ws.TILE], out_dtype).reshape(*lead, k)
    compiled = launch(cfg)
    if layout != "ws":  # (grad_input_ws.launch writes its own)
        kernel = _grad_input_t_kernel if layout == "transposed" else _grad_input_kernel
        tuning.dump_source(kernel, compiled, {**cfg, "per_channel": per_channel, "grad": str(grad.dtype)})
    return out.reshape(*lead, k)


def grad_input_quantized(
    grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, k: int, bits: int, wrap: Optional[Callable] = None
) -> torch.Tensor:
    """``reference.grad_input_quantized`` on the GPU: the per-row quantization of ``grad``
    (per-channel ``s_w`` folded in) is the activation-quantization kernel, and ``q @ W_int``
    is the forward matmul kernel on int8 tensor cores, fed ``W_int^T`` re-laid out from the
    packed weights (``layout.transposed_kblocked``, one pass over the packed bytes); its epilogue
    applies the scales."""
    from bitcompile.kernels.act_quant import norm_quant
    from bitcompile.kernels.layout import transposed_kblocked
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    check_bits("grad_input_bits", bits, "exact STE input gradient")
    _check_operands(grad, wq, k)
    n = wq.shape[0]
    per_channel = w_scale.numel() > 1
    ws = w_scale.float().contiguous()
    q, s, _, _ = norm_quant(grad, bits, "none", ws if per_channel else None, wrap=wrap, qeps=GRAD_EPS)
    out_scale = torch.ones_like(ws[:1]) if per_channel else ws
    return ternary_matmul(
        q, transposed_kblocked(wq, k, wrap), n, s, out_scale, None, grad.dtype, layout="kblocked", wrap=wrap, keep=False
    )
