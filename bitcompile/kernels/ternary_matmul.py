"""Packed-ternary matmul: int8 activations x 2-bit trits, exact int32 accumulation.

The kernels read the K-blocked "nibbles" layout (``bitcompile.numerics.packing``): each
quarter of a 32-bit word is 4 trits of consecutive K, so every activation load is a
contiguous slice, and one ``prmt`` (a byte permute whose selectors are the word's 4-bit pair
codes, reading a constant table) turns a quarter into 4 signed int8 trits in one register
(``common.KBLOCK_PTX``: 5 ops per 16 trits).
  * ``_gemv_kernel`` (M <= GEMV_MAX_M, decode): CUDA cores. Each quarter's 4 signed trits meet
    4 int8 activations in one ``dp4a`` (4 multiply-adds per instruction); signed trits need no
    sum(x) correction, which every program would otherwise compute over the whole activation
    row. Both operands are loaded at the accumulator's shape, so the loop never exchanges data
    between threads (no shared memory, no barriers), and R weight rows per thread share each
    activation load.
  * ``_gemm_kernel`` (larger M): int8 tensor cores, optionally with the operands swapped
    (C^T tile = trits [BN, K] @ A^T [K, BM]: the trits are then the operand the MMA takes
    from registers). A 256-trit block is one dot (``JOIN_K``) or four, one per quarter
    (``common.kblock_quarter``); the activations stream
    in through ``cp.async`` (Triton's pipeliner) or, for large M, by TMA (``A_TMA``: a host
    ``TensorDescriptor`` in eager launches, one built in the kernel in traced launches).
  * ``wgmma_matmul`` (2 <= M <= 64, eager launches): the same tensor-core product in Gluon,
    where the MMA wait is explicit, so a program decodes the next block while the current
    one's MMAs run. Traced launches (Inductor's
    generated code launches Triton kernels only) and rows TMA cannot describe take the Triton
    kernels, tuned under their own key ``ternary_mm_triton``.
All share one epilogue (``common.matmul_epilogue``): ``acc * s_w * s_x (+ bias)``, an optional activation,
an optional residual add, and the cast to the output dtype, in the reference's order.
How each kernel works and what its design choices measure on the H100: ``docs/kernels.md``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning, wgmma_matmul
from bitcompile.kernels.common import (
    ACTIVATIONS,
    ZERO_WORD,
    grouped_tile,
    kblock_quarter,
    kblock_quarter_from,
    matmul_epilogue,
    pair_tables_in_registers,
    split_k_total,
    unpack_kblock,
)
from bitcompile.kernels.layout import QUARTER, kblocked, relayout

GEMV_MAX_M = 16  # dp4a cost grows with M: from 2 rows on, tuning times it against the tensor cores


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the 4 signed bytes of a times those of b, int32."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:  # the interpreter has no PTX: the same sum, byte by byte
        for j in tl.static_range(4):
            c += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return c


@triton.jit
def _in_thread(x, R: tl.constexpr):
    """``x`` repeated along R in-thread axes (``tl.join`` adds register axes only), to meet
    the R rows of :func:`_row_words`: the same registers, no loads, no data moved."""
    if R == 1:
        y = x
    elif R == 2:
        y = tl.join(x, x)
    else:
        y = tl.join(tl.join(x, x), tl.join(x, x))
    return y


@triton.jit
def _row_word(P, row, N, stride_pn, offs, mask, MASKED: tl.constexpr):
    ptrs = P + (row % N).to(tl.int64) * stride_pn + offs  # rows past N read a valid row, never stored
    if MASKED:  # out-of-range words read as sixteen zero trits
        return tl.load(ptrs, mask=mask, other=ZERO_WORD, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, eviction_policy="evict_first")


@triton.jit
def _row_words(P, row, N, stride_pn, offs, mask, MASKED: tl.constexpr, R: tl.constexpr):
    """Words ``offs`` of rows ``row + r``, r < R, one load each, joined into in-thread axes
    (R = 4: axes [a, b], r = 2a + b). Each weight is read once, so it is loaded ``evict_first``
    (2-4% faster at M=1 than the default policy on the H100)."""
    w = _row_word(P, row, N, stride_pn, offs, mask, MASKED)
    if R == 2:
        w = tl.join(w, _row_word(P, row + 1, N, stride_pn, offs, mask, MASKED))
    elif R == 4:
        w = tl.join(
            tl.join(w, _row_word(P, row + 2, N, stride_pn, offs, mask, MASKED)),
            tl.join(
                _row_word(P, row + 1, N, stride_pn, offs, mask, MASKED),
                _row_word(P, row + 3, N, stride_pn, offs, mask, MASKED),
            ),
        )
    return w


@triton.jit
def _step_words(P, row, N, stride_pn, word, w, PW, BW: tl.constexpr, EVEN: tl.constexpr, R: tl.constexpr):
    """The weights of the step at word ``w``. With EVEN (whole steps, no partial words) no load
    needs a mask, and a step past the end re-reads the last one."""
    if EVEN:
        return _row_words(P, row, N, stride_pn, word + tl.minimum(w, PW - BW), None, False, R)
    return _row_words(P, row, N, stride_pn, word + w, w + word < PW, True, R)


@triton.jit
def _gemv_kernel(
    A,
    P,
    C,
    XS,
    WS,
    BIAS,
    RES,
    M,
    N,
    XW,
    PW,
    ZERO,
    stride_am,
    stride_pn,
    stride_cm,
    stride_rm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BW: tl.constexpr,
    R: tl.constexpr,
    EVEN: tl.constexpr,
    USE_ASM: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RES: tl.constexpr,
    AHEAD: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    # A: int32 words of 4 int8 activations [M, XW]; P: int32 words of 4 K-blocked bytes
    # [N, PW]. Word w of a 16-word (256-trit) block, quarter i, holds trits
    # k = 256 * block + 64 i + 4 (w % 16) + 0..3, i.e. activation word 64 block + 16 i + w % 16.
    # Tiles are [BM, BN / R, NB, 16] x R: NB blocks of 16 words, so loads are visibly contiguous
    # (16-byte vectors), and R rows per thread in in-thread axes, which share each activation
    # load (one row per thread costs 4 L1 activation loads per weight load, which keeps the GEMV
    # well above the read-only kernel's time). Both dp4a
    # operands are otherwise loaded at the full tile shape (pointers broadcast over the other
    # operand's axis; L1 serves the repeats): a [BN, ..] weight tile met with a [BM, ..]
    # activation tile makes Triton move the codes through shared memory, with a barrier, four
    # times per step (SASS; tools/inspect_kernels.py).
    # ZERO: a run-time 0 that keeps the prmt tables in registers (common.pair_tables_in_registers).
    G: tl.constexpr = BN // R  # row groups: across threads and warps
    pid_n = tl.program_id(0)
    m4 = tl.arange(0, BM)[:, None, None, None]
    g4 = tl.arange(0, G)[None, :, None, None]
    b4 = tl.arange(0, BW // 16)[None, None, :, None]
    q4 = tl.arange(0, 16)[None, None, None, :]
    full = 0 * m4 + 0 * g4  # [BM, G, 1, 1] zeros: broadcasts an index to the full tile shape
    word = b4 * 16 + q4 + full  # word within the tile
    x_word = b4 * 64 + q4 + full  # its activation word for shift 0
    row = pid_n * BN + g4 * R + full  # each group's first row
    x_ptrs = A + (m4 % M) * stride_am + x_word
    acc = _in_thread(tl.zeros((BM, G, BW // 16, 16), dtype=tl.int32), R)
    if USE_ASM:
        ta, tb, ua, ub = pair_tables_in_registers(_in_thread(ZERO * word, R))
    # PDL (tuning.pdl): what follows may launch now; the weights of the first AHEAD steps are
    # requested before waiting for the kernel before this one (the activations' quantizer).
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    p = _row_words(P, row, N, stride_pn, word, word < PW, not EVEN, R)
    if AHEAD == 2:
        p1 = _step_words(P, row, N, stride_pn, word, BW, PW, BW, EVEN, R)
    if PDL:
        tl.extra.cuda.gdc_wait()  # before the loop: nothing the pipeliner hoists reads A earlier
    for w0 in range(0, PW, BW):
        # The weights AHEAD steps on are requested before this step's arithmetic (a register
        # buffer), so each program has a DRAM load in flight while it computes.
        p_next = _step_words(P, row, N, stride_pn, word, w0 + AHEAD * BW, PW, BW, EVEN, R)
        for i in tl.static_range(4):
            xi = 4 * w0 + 16 * i
            x = _in_thread(tl.load(x_ptrs + xi, mask=(xi + x_word < XW) | EVEN, other=0), R)
            if USE_ASM:
                t = kblock_quarter_from(p, ta, tb, ua, ub, i)
            else:
                t = kblock_quarter(p, i, 0, 0, False)
            acc = _dp4a(t, x, acc, USE_ASM)
        if AHEAD == 2:
            p = p1
            p1 = p_next
        else:
            p = p_next
    out = tl.reshape(tl.sum(tl.sum(acc, axis=3), axis=2), (BM, BN))  # [BM, G, (a, b)]: row g R + 2a + b
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    matmul_epilogue(
        out,
        C,
        XS,
        WS,
        BIAS,
        RES,
        offs_m,
        offs_n,
        M,
        N,
        stride_cm,
        stride_rm,
        EPILOGUE,
        PER_CHANNEL,
        HAS_BIAS,
        ACTIVATION,
        HAS_RES,
    )


@triton.jit
def _mma(acc, w, a, SWAP: tl.constexpr):
    """acc += w @ a^T (trits as the left operand, acc is C^T) or a @ w^T."""
    if SWAP:
        return tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
    else:
        return tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)


@triton.jit
def _gemm_kernel(
    A,
    P,
    C,
    XS,
    WS,
    BIAS,
    RES,
    PARTIAL,
    COUNT,
    M,
    N,
    K,
    KPB,
    stride_am,
    stride_pn,
    stride_cm,
    stride_rm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_N: tl.constexpr,
    Q: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STORE_PARTIALS: tl.constexpr,
    SWAP: tl.constexpr,
    JOIN_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RES: tl.constexpr,
    A_TMA: tl.constexpr,
    HOST_DESC: tl.constexpr,
):
    # A_TMA: the tensor memory accelerator fetches the activations (blocks [BM, 4Q] joined,
    # [BM, Q] per quarter), zero-filling past M and K. A is then a host TensorDescriptor
    # (HOST_DESC) or the int8 pointer, described here (traced launches: Inductor cannot take a
    # host descriptor through wrap_triton; the device copy needs Triton's scratch allocator).
    # Grouped order over (weight row tiles, token tiles): GROUP_N weight tiles share L2.
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, Q)
    offs_k = tl.arange(0, 4 * Q)
    # Rows past N / M load a valid row instead (their results are never stored), so the
    # loads need no row masks (per-byte selects in the loop otherwise); K needs a mask only
    # when it is not whole 256-trit blocks (past K the trits are zero, the memory may not be).
    p_ptrs = P + (offs_n % N)[:, None].to(tl.int64) * stride_pn + offs_j[None, :]
    if not A_TMA:
        a_rows = A + (offs_m % M)[:, None].to(tl.int64) * stride_am
    elif not HOST_DESC:
        A = tl.make_tensor_descriptor(A, [M, K], [stride_am, 1], [BM, 4 * Q if JOIN_K else Q])
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    # Split-K (small M: enough programs to stream the weights at full bandwidth): program
    # pid_k takes a run of 256-trit blocks.
    pid_k = tl.program_id(1)
    blocks = tl.cdiv(tl.cdiv(KPB, Q), SPLIT_K)
    k_lo = pid_k * blocks * Q
    k_hi = min(KPB, k_lo + blocks * Q)
    for kb in range(k_lo, k_hi, Q):
        p = tl.load(p_ptrs + kb)
        if JOIN_K:
            # The whole block in one dot: the tensor cores are waited on once per block, not
            # once per quarter (Triton waits after every dot whose operand is computed in the loop).
            if A_TMA:
                a = A.load([pid_m * BM, 4 * kb])
            else:
                k = 4 * kb + offs_k
                a = tl.load(a_rows + k[None, :], mask=(k[None, :] < K) | EVEN_K, other=0)
            acc = _mma(acc, unpack_kblock(p, BN, Q, USE_ASM), a, SWAP)
        else:
            for i in tl.static_range(4):
                if A_TMA:
                    a = A.load([pid_m * BM, 4 * kb + i * Q])
                else:
                    k = 4 * kb + i * Q + offs_j
                    a = tl.load(a_rows + k[None, :], mask=(k[None, :] < K) | EVEN_K, other=0)
                acc = _mma(acc, kblock_quarter(p, i, BN, Q, USE_ASM), a, SWAP)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    if SPLIT_K > 1:
        at = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        out, last = split_k_total(
            out, at, PARTIAL, COUNT, pid_n * tl.cdiv(M, BM) + pid_m, pid_k, BM * BN, SPLIT_K, STORE_PARTIALS, USE_ASM
        )
    else:
        last = True
    if last:
        matmul_epilogue(
            out,
            C,
            XS,
            WS,
            BIAS,
            RES,
            offs_m,
            offs_n,
            M,
            N,
            stride_cm,
            stride_rm,
            EPILOGUE,
            PER_CHANNEL,
            HAS_BIAS,
            ACTIVATION,
            HAS_RES,
        )


_workspaces: dict = {}


def _split_k_workspace(device: torch.device, numel: int, tiles: int):
    """Zeroed partial sums and arrival counters, per device and stream (the kernel leaves them
    zeroed; two streams must not share one)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    ws = _workspaces.get(key)
    if ws is None or ws[0].numel() < numel or ws[1].numel() < tiles:
        ws = (
            torch.zeros(max(numel, 1 << 16), device=device, dtype=torch.int32),
            torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32),
        )
        _workspaces[key] = ws
    return ws


_graph_counters: dict = {}
GRAPH_COUNTERS = 1 << 14  # split-K tiles one launch may count in the preallocated array


def make_split_k_counters(device: torch.device) -> None:
    """Allocate the device's arrival counters for split-K launches with ``keep=False`` now (at
    compile time: made during a CUDA graph's warm-up, they would be pool memory the graph does
    not track). Every such launch on the device shares them: its last program leaves them zero,
    and launches on one stream (a CUDA graph's replay) run one after another; graphs replayed
    on two streams at once must not both launch split-K matmuls."""
    if device not in _graph_counters:
        _graph_counters[device] = torch.zeros(GRAPH_COUNTERS, device=device, dtype=torch.int32)


def _gemv_configs(m: int):
    if tuning.interpreting():  # rows per thread R spread over the tests' M
        return [dict(kernel="gemv", BN=4, BW=32, R=(2, 4, 1)[m % 3], num_warps=4)]
    # (BN, BW, warps, stages), timed on the H100 with benchmarks/sweep_matmul.py (docs/kernels.md):
    # each wins at some shape; 1-2 warp programs (up to 32 per SM) win at 8192^2 and 14336x4096.
    shapes = [
        (4, 64, 4, 3),
        (8, 64, 4, 3),
        (4, 128, 4, 2),
        (8, 128, 8, 2),
        (4, 128, 8, 3),
        (2, 128, 4, 3),
        (8, 128, 4, 3),
        (16, 128, 8, 2),
        (4, 64, 2, 2),
        (2, 128, 2, 2),
        (8, 64, 2, 2),
        (4, 128, 2, 2),
        (2, 64, 1, 2),
        (4, 32, 1, 2),
    ]
    configs = [dict(kernel="gemv", BN=bn, BW=bw, R=1, num_warps=w, num_stages=s) for bn, bw, w, s in shapes]
    if m == 1:  # (BN, R, BW, warps, stages): R rows per thread share the activation loads
        configs += [
            dict(kernel="gemv", BN=bn, R=r, BW=bw, num_warps=w, num_stages=s)
            for bn, r, bw, w, s in [
                (4, 4, 128, 1, 2),
                (4, 4, 128, 1, 3),
                (4, 4, 256, 1, 2),
                (8, 4, 128, 2, 2),
                (16, 4, 128, 4, 2),
                (2, 2, 128, 1, 2),
                (2, 2, 128, 1, 3),
                (4, 2, 128, 2, 3),
                (8, 2, 128, 4, 3),
                # 64-word steps: rows of K = 4096 are only two 128-word steps
                (8, 4, 64, 1, 2),
                (8, 4, 64, 1, 3),
                (16, 4, 64, 2, 2),
                (4, 4, 256, 2, 2),
            ]
        ]
    elif m > 4:  # BM x BN x BW accumulators: keep the register tile small
        configs = [
            dict(kernel="gemv", BN=bn, BW=bw, R=1, num_warps=w, num_stages=s)
            for bn, bw, w, s in [(2, 64, 4, 3), (4, 64, 8, 3), (2, 128, 8, 2), (1, 128, 4, 3)]
        ]
    return configs


def _gemm_configs(m: int):
    if tuning.interpreting():
        return [
            dict(kernel="gemm", BN=16, BM=16, GROUP_N=4, SPLIT_K=sk, SWAP=sw, JOIN_K=jk, num_warps=4)
            for sk, sw, jk in ((2, True, True), (1, False, False), (1, False, True), (2, True, False))
        ]
    # Timed on the H100 with benchmarks/sweep_matmul.py; the measurements behind each list are in
    # docs/kernels.md.
    if m <= 32:  # (BN, BM, split, swap, warps, stages): split-K gives the few weight tiles enough programs
        shapes = [
            (64, 16, 4, 1, 4, 3),
            (64, 16, 2, 1, 4, 3),
            (32, 16, 4, 1, 4, 3),
            (32, 16, 1, 1, 4, 3),
            (32, 16, 4, 0, 4, 3),
            (64, 16, 4, 0, 4, 3),
            (16, 16, 4, 0, 4, 3),
            (64, 32, 4, 1, 4, 3),
            (32, 16, 1, 0, 4, 3),
            (64, 16, 8, 1, 4, 3),
            (128, 16, 4, 1, 4, 3),
            (128, 16, 8, 1, 4, 3),
            (32, 16, 8, 1, 4, 3),
            # deeper pipelines: ahead at 4096^2 and M=4, a tie at 8192^2
            (64, 16, 4, 1, 4, 5),
            (64, 16, 2, 1, 4, 5),
            (64, 16, 8, 1, 4, 4),
            (32, 16, 4, 1, 4, 5),
        ]
    elif m <= 256:
        # One 4-warp program per SM (128 tiles at 8192^2) issues an instruction only every ~3.5
        # cycles (ncu): smaller tiles, 8 warps or split-K give each SM more warps.
        shapes = [
            (128, 64, 1, 1, 4, 3),
            (128, 128, 1, 1, 8, 3),
            (64, 64, 2, 1, 4, 3),
            (128, 64, 2, 0, 4, 3),
            (128, 128, 1, 0, 8, 3),
            (64, 128, 2, 0, 4, 3),
            (128, 128, 2, 0, 8, 3),
            (64, 64, 1, 1, 4, 3),
            (128, 64, 1, 1, 8, 3),
            (64, 128, 1, 1, 4, 3),
            (64, 32, 1, 1, 4, 3),
            (128, 64, 2, 1, 4, 3),
            (64, 64, 4, 1, 4, 3),
            # 4-5 stages: the best M=128 tiles at 8192^2 with the prmt decode
            (64, 64, 1, 1, 4, 4),
            (64, 64, 1, 1, 4, 5),
            (128, 64, 1, 1, 4, 4),
            (64, 64, 2, 1, 4, 4),
            (64, 32, 1, 1, 4, 4),
        ]
    else:  # the 2-stage 128x128 tiles fit two programs per SM (registers and shared memory), so
        # one program's unpack can overlap the other's tensor-core work (Triton waits on each dot)
        shapes = [
            (128, 256, 1, 1, 8, 3),
            (256, 128, 1, 0, 8, 3),
            (128, 256, 1, 0, 8, 3),
            (128, 128, 1, 0, 8, 4),
            (256, 128, 1, 1, 8, 3),
            (128, 128, 1, 1, 8, 2),
            (128, 128, 1, 0, 8, 2),
        ]
    # JOIN_K: one dot per 256-trit block instead of one per quarter (both are timed). Left out:
    # what needs more than the H100's 227 KB of shared memory (4-stage 128x256 tiles, and the
    # joined 256-row activation tile unswapped).
    configs = [
        dict(kernel="gemm", BN=bn, BM=bm, SPLIT_K=sk, SWAP=bool(sw), JOIN_K=jk, GROUP_N=8, num_warps=w, num_stages=s)
        for bn, bm, sk, sw, w, s in shapes
        for jk in (False, True)
        if not (jk and bm == 256 and not sw)
    ]
    if m > 256:  # activations by TMA, for the swapped tiles: no unswapped TMA tile wins on the H100
        configs += [dict(c, A_TMA=True) for c in configs if c["SWAP"]]
    return configs


def _wgmma_configs(m: int):
    # M = 1 is the GEMV's: a 16-row token tile for one token is about half the GEMV's speed.
    if tuning.interpreting() or not wgmma_matmul.available() or not 2 <= m <= wgmma_matmul.MAX_M:
        return []
    # (BN, NB blocks per step, stages, split), timed on the H100 (sweep_matmul.py --kernels wgmma; see
    # docs/kernels.md): 4-block steps and 3-4 stage rings win at 8192^2, split 4 at K = 14336.
    shapes = [
        (64, 2, 3, 1),
        (64, 2, 4, 1),
        (64, 4, 3, 1),
        (64, 4, 4, 1),
        (64, 4, 5, 1),
        (64, 4, 6, 1),
        (64, 8, 3, 1),
        (64, 2, 4, 2),
        (64, 4, 3, 2),
        (64, 2, 3, 4),
        (64, 2, 4, 4),
        (64, 1, 4, 4),
    ]
    configs = [dict(kernel="wgmma", BN=bn, NB=nb, STAGES=s, SPLIT_K=sk, num_warps=4) for bn, nb, s, sk in shapes]
    if m <= GEMV_MAX_M:
        # The mma.sync form, (BN, NB, stages, split, warps): 16 weight rows per warp and MMA. At 8 rows
        # its best beat the warpgroup form's by 3-13% at Llama-3-8B's shapes (H100, BENCHMARKS.md
        # round 35), with 64-row tiles every time; the list still spans tile height and split-K.
        sync_shapes = [
            (64, 2, 4, 1, 4),
            (64, 4, 4, 1, 4),
            (64, 4, 3, 1, 4),
            (64, 2, 4, 2, 4),
            (64, 2, 4, 4, 4),
            (128, 2, 4, 1, 4),
            (128, 2, 4, 1, 8),
            (128, 2, 4, 4, 8),
            (32, 4, 4, 1, 2),
            (32, 4, 4, 4, 2),
        ]
        configs += [
            dict(kernel="mma_sync", BN=bn, NB=nb, STAGES=s, SPLIT_K=sk, num_warps=w) for bn, nb, s, sk, w in sync_shapes
        ]
    configs += [dict(c, WIDE=True) for c in configs if c["NB"] % 2 == 0]
    return [c for c in configs if wgmma_matmul.fits(m, sync=c["kernel"] == "mma_sync", **c)]


def _candidates(m: int) -> list[dict]:
    """Every launch configuration tuning may pick at M rows: for 2 <= M <= GEMV_MAX_M both kernels."""
    return (_gemv_configs(m) if m <= GEMV_MAX_M else []) + (_gemm_configs(m) if m > 1 else []) + _wgmma_configs(m)


@functools.lru_cache(maxsize=256)  # bounded: a server sees many distinct M (prefill lengths)
def _launch_candidates(m: int, gluon_ok: bool, interpreting: bool) -> tuple[str, tuple[dict, ...]]:
    """The tuning key's name and the candidates of one launch, built once per (M, kind of
    launch). Rebuilding them on every call (with ``triton.cdiv``/``next_power_of_2``, constexpr
    functions that cost ~1.5 us per host call) would take an eager M=16 launch from ~140 to ~480 us
    of host time. The configurations are shared: nothing may modify them."""
    candidates = _candidates(m)
    name = "ternary_mm"
    if not gluon_ok and any(c["kernel"] in wgmma_matmul.KINDS for c in candidates):
        # The Gluon kernel is ruled out for this call (traced launches: Inductor generates
        # Triton launch code only; rows TMA cannot describe): the Triton kernels' own choice.
        candidates = [c for c in candidates if c["kernel"] not in wgmma_matmul.KINDS]
        name = "ternary_mm_triton"
    if interpreting:
        # No timing here: spread the CPU tests' M over every kernel variant instead.
        gemv = [c for c in candidates if c["kernel"] == "gemv"]
        gemm = [c for c in candidates if c["kernel"] == "gemm"]
        candidates = gemv if gemv and (m <= 4 or m % 2 == 0) else [gemm[m % len(gemm)]]
    return name, tuple(candidates)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """An int8/uint8 [R, C] tensor (C % 4 == 0) viewed as int32 words [R, C / 4]."""
    try:
        return t.view(torch.int32)
    except RuntimeError:  # storage offset not word aligned
        return t.clone().view(torch.int32)


def ternary_matmul(
    a: torch.Tensor,
    wq: torch.Tensor,
    k: int,
    x_scale: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.int32,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    layout: str = "canonical",
    wrap: Optional[Callable] = None,
    keep: bool = True,
) -> torch.Tensor:
    """``a int8 [..., K] @ trits(wq)^T``. ``wq`` is canonical packed ``[N, ceil(K/4)]``
    (re-laid out once, cached) or, with ``layout="kblocked"``, already K-blocked.
    ``keep=False``: nothing allocated here outlives the call (no cached K-blocked copy, no
    shared split-K workspace), for weights re-packed every step (QAT) and CUDA graph
    recording, where a kept allocation would be pool memory the graph does not track.
    Without scales: the exact int32 accumulator. With ``x_scale [..., 1]`` and
    ``w_scale [N] | [1]``: the dequantized ``out_dtype`` output with bias, ``activation``
    and ``residual [..., N]`` fused (``swiglu``: N / 2 outputs ``silu(gate) * up`` of weight
    rows interleaved gate, up, ..., ``reference.interleave_rows``).

    ``wrap=torch.library.wrap_triton`` launches through it (the ops' Inductor-visible twins: traceable,
    so Inductor compiles and launches the kernel from its own generated code); the
    launch configuration is then taken from the tuning cache, tuned first on stand-in
    tensors if missing."""
    if a.dtype != torch.int8 or wq.dtype != torch.uint8:
        raise TypeError(f"ternary_matmul needs int8 activations and uint8 packed weights, got {a.dtype}, {wq.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    if layout not in ("canonical", "kblocked"):
        raise ValueError(f"unknown packed layout {layout!r}; supported: canonical, kblocked")
    n = wq.shape[0]
    if a.shape[-1] != k or wq.dim() != 2:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, packed {tuple(wq.shape)}, k={k}")
    if layout != "canonical":
        blocked = wq.contiguous()
    else:
        blocked = kblocked(wq, k) if keep else relayout(wq, k, wrap)
    kpb = blocked.shape[1]
    if kpb != -(-k // (4 * QUARTER)) * QUARTER:
        raise ValueError(f"packed weights {tuple(wq.shape)} do not hold k={k} trits in the {layout} layout")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    epilogue = w_scale is not None
    swiglu = activation == "swiglu"
    if swiglu and (n % 2 or not epilogue):
        raise ValueError(f"the swiglu epilogue needs scales and an even number of weight rows (gate, up), got {n}")
    width = n // 2 if swiglu else n  # output columns
    c = torch.empty((m, width), device=a.device, dtype=out_dtype if epilogue else torch.int32)
    if m == 0 or n == 0:
        return c.reshape(*lead, width)
    xs = x_scale.reshape(-1).contiguous() if epilogue else c
    ws = w_scale.contiguous() if epilogue else c
    res = residual.reshape(m, width).contiguous() if residual is not None else c
    flags = dict(
        EPILOGUE=epilogue,
        PER_CHANNEL=epilogue and w_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS[activation],
        HAS_RES=residual is not None,
    )
    tail = (xs, ws, bias if bias is not None else c, res)

    a2 = a2.contiguous()
    aw = pw = None
    if m <= GEMV_MAX_M:
        # dp4a reads int32 words: whole words of activations
        aw = _as_words(torch.nn.functional.pad(a2, (0, 4 - k % 4)) if k % 4 else a2)
        pw = blocked.view(torch.int32)
    pdl = wrap is None and tuning.pdl(a.device)
    gemv_flags = dict(BM=1 << (m - 1).bit_length(), USE_ASM=not tuning.interpreting(), PDL=pdl)

    # The Gluon kernel's epilogue takes no swiglu: such launches choose among the Triton kernels.
    gluon_ok = wrap is None and wgmma_matmul.supports(m, k, a2) and not swiglu

    def split_k_buffers(cfg, tiles):
        """Partial tiles and arrival counters for a split-K launch (unused otherwise)."""
        if cfg["SPLIT_K"] == 1:
            return c, c
        store_partials = wrap is None  # see common.split_k_total
        numel = tiles * cfg["BM"] * cfg["BN"] * (cfg["SPLIT_K"] if store_partials else 1)
        if wrap is not None:  # traced, a graph input cannot be a global buffer
            return (
                torch.zeros(numel, device=a.device, dtype=torch.int32),
                torch.zeros(tiles, device=a.device, dtype=torch.int32),
            )
        if not keep:
            # Stored partials need no zeros; the counters come from the device's preallocated
            # array where there is one (a fill launch fewer per call under CUDA graphs).
            counters = _graph_counters.get(a.device)
            if counters is None or counters.numel() < tiles:
                counters = torch.zeros(tiles, device=a.device, dtype=torch.int32)
            return torch.empty(numel, device=a.device, dtype=torch.int32), counters
        return _split_k_workspace(a.device, numel, tiles)

    def activation_loads(cfg):
        """TMA needs 16-byte aligned rows and base, otherwise the same tile loads by pointers.
        A traced launch checks the storage offset (Inductor's buffers and, copied if not,
        graph inputs are aligned) and describes the activations on the device, where the
        launcher allows it (not under the C++ wrapper: ``tuning.device_descriptors_ok``)."""
        aligned = a2.storage_offset() % 16 == 0 if wrap is not None else a2.data_ptr() % 16 == 0
        described = wrap is None or tuning.device_descriptors_ok()
        tma = bool(cfg.get("A_TMA", False) and k % 16 == 0 and aligned and described)
        return dict(A_TMA=tma, HOST_DESC=tma and wrap is None)

    def launch(cfg):
        cfg = dict(cfg)
        kind = cfg.pop("kernel")
        if kind in wgmma_matmul.KINDS:
            if not gluon_ok:
                raise ValueError(f"the Gluon matmul cannot take this launch (m={m}, k={k}, traced={wrap is not None})")
            sync = kind == "mma_sync"
            bm = wgmma_matmul.token_tile(m, sync)
            buffers = split_k_buffers(dict(cfg, BM=bm), -(-n // cfg["BN"]))
            return wgmma_matmul.launch(a2, blocked, c, tail, buffers, m, n, flags, sync=sync, pdl=pdl, **cfg)
        if kind == "gemv":
            gemv = tuning.traceable(_gemv_kernel, wrap)
            cfg.setdefault("R", 1)  # table entries without R use one row per thread
            # with PDL two steps' weights are requested before the wait, where there are two
            cfg.setdefault("AHEAD", 2 if pdl and pw.shape[1] >= 2 * cfg["BW"] else 1)
            return gemv[(-(-n // cfg["BN"]),)](
                aw,
                pw,
                c,
                *tail,
                m,
                n,
                aw.shape[1],
                pw.shape[1],
                0,
                aw.stride(0),
                pw.stride(0),
                c.stride(0),
                res.stride(0),
                EVEN=pw.shape[1] % cfg["BW"] == 0 and aw.shape[1] == 4 * pw.shape[1],
                **flags,
                **gemv_flags,
                **cfg,
                **({"launch_pdl": True} if pdl else {}),
            )
        tiles = -(-m // cfg["BM"]) * -(-n // cfg["BN"])
        gemm = tuning.traceable(_gemm_kernel, wrap)
        cfg.update(activation_loads(cfg))
        a_arg = a2
        if cfg["HOST_DESC"]:
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_arg = TensorDescriptor.from_tensor(a2, [cfg["BM"], 4 * QUARTER if cfg["JOIN_K"] else QUARTER])
        elif cfg["A_TMA"]:
            tuning.use_scratch_allocator()
        return gemm[(tiles, cfg["SPLIT_K"])](
            a_arg,
            blocked,
            c,
            *tail,
            *split_k_buffers(cfg, tiles),
            m,
            n,
            k,
            kpb,
            a2.stride(0),
            blocked.stride(0),
            c.stride(0),
            res.stride(0),
            STORE_PARTIALS=wrap is None,
            Q=QUARTER,
            EVEN_K=k % (4 * QUARTER) == 0,
            USE_ASM=not tuning.interpreting(),
            **flags,
            **cfg,
        )

    name, candidates = _launch_candidates(m, gluon_ok, tuning.interpreting())
    key = (tuning.bucket(m), n, k)
    tuning.tune_before_tracing(
        wrap,
        name,
        key,
        candidates,
        lambda: ternary_matmul(
            torch.randint(-127, 128, (m, k), device=a.device, dtype=torch.int8),
            torch.randint(0, 256, tuple(blocked.shape), device=a.device, dtype=torch.uint8),
            k,
            layout="kblocked",
        ),
    )
    cfg = tuning.choose(name, key, candidates, launch)
    if swiglu and cfg["BN"] < 2:  # a tile holds whole (gate, up) row pairs
        cfg = dict(cfg, BN=2)
    kernel = {"gemv": _gemv_kernel, "gemm": _gemm_kernel}.get(cfg["kernel"]) or wgmma_matmul._wgmma_kernel
    compiled = launch(cfg)
    launched = {**cfg, **activation_loads(cfg)} if kernel is _gemm_kernel else cfg
    tuning.dump_source(kernel, compiled, {**flags, **launched, "out": str(c.dtype)})
    return c.reshape(*lead, width)
