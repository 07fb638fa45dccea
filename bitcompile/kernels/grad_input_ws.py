"""Exact-STE input gradient on Hopper, warp-specialised (Gluon): ``out = g @ (trits * s_w)``.

In the Triton kernels (``grad_input``) the same warps decode the trits and issue the tensor
cores, and ptxas orders the decode after each MMA wait, so the two take turns (0.63x cuBLAS on
this GEMM). Here they are separate warps of one CTA:
  * 8 MMA warps (the default partition) compute the tile transposed, out^T [BK, BM] =
    trits^T @ g^T: each warpgroup one m64 block of K rows at n = BM = 256, so a step's 4 wgmma
    read the trits once and the grad tile twice (the [BM, BK] orientation, m64 blocks of tokens
    at n128, read the trits four times: 148 against 130 KB of shared-memory traffic per step,
    0-8% slower). They issue a step as soon as its grad tile (TMA, STAGES deep) and trits (SB deep)
    are ready, keep one step in flight, release step i - 1's buffers and fetch the grad tile
    STAGES - 1 steps ahead;
  * 4 decode warps TMA the canonical packed bytes (STAGES deep), turn each step's into 16-bit
    +-1 / 0 with one ``prmt`` per two trits (``common.ONE_TABLES``), store them for the MMA
    (``fence_async_shared``) and signal an mbarrier.
12 warps: ptxas gives every warp the launch's register limit (168), which the MMA warps'
fp32 accumulator (BM x BK / 256 threads) needs; 16 warps cap it at 128. The epilogue relabels
the accumulator's rows to K order and stores it transposed through shared memory.

The product per step is the same 16-bit operands summed in fp32 in 16-wide chunks as in
``grad_input._grad_input_t_kernel``, then scaled by the one weight scale rounded to the grad
dtype: bit-equal to it on the H100. 1.36-1.42x that kernel, 0.82-0.90x cuBLAS at QAT shapes.
With fixed trits stored every step instead of decoded (timing only) the same loops run at
0.90-0.97x cuBLAS: the decode's work (loading and decoding the bytes) is the remaining cost, and
at the largest shapes every kernel, cuBLAS included, runs at the H100's 700 W cap
(``benchmarks/bench_grad_input.py --limits``; docs/kernels.md).

Takes: sm_90, 16-bit grads, one weight scale, TMA-describable operands (grad rows of whole
16 bytes, packed rows of whole 16 bytes: ``supports``). Tails of M, N and K are TMA's zero
fill (zero grads meet whatever the zero bytes decode to) and the store's mask.
"""

from __future__ import annotations

import functools

import torch

from bitcompile.kernels import tuning
from bitcompile.kernels.common import ONE_TABLES, grouped_tile, int32

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from bitcompile.kernels.wgmma_matmul import tma_load
except ImportError:  # a Triton without Gluon: the Triton kernels serve every shape
    gluon = None

STEP = 64  # reduction rows (of N) per step: one 16-bit swizzle atom of the grad tile
MMA_WARPS, DECODE_WARPS, DECODE_REGS, MAX_REGS = 8, 4, 64, 168
# Tuning candidates (``grad_input._configs``). BK is 64 K rows per MMA warpgroup; BM the MMA's n.
# On the H100 BM 256 / 4 stages / SB 3 is best; STAGES 3 or 5, SB 4 and more decode registers
# are within 2%, smaller BM well behind (docs/kernels.md).
TILE = ("BM", "BK", "STAGES", "SB", "GROUP_K")  # a configuration's fields, in ``bitnet::grad_input_ws``'s order
CONFIGS = [dict(BM=256, BK=128, STAGES=4, SB=3, GROUP_K=16), dict(BM=256, BK=128, STAGES=4, SB=3, GROUP_K=8)]


# Decode of one word $8 of canonical bytes (codes c = trit + 1 at bits 2s of byte e, trit k =
# 4e + s): for each s, the four bytes' codes c -> selector bytes (c, 4 + c) by one multiply,
# then one prmt per two bytes into the tables $9 (low bytes of the 16-bit value by code) and
# $13 (high bytes): $2s = field s of bytes 0, 1 and $2s+1 = field s of bytes 2, 3, each a
# pair of 16-bit values. 23 instructions per 16 trits. Checked on the CPU by interpreting this
# text (tests/kernels/test_grad_input.py).
DECODE_PTX_TEXT = (
    "{ .reg .b32 c, u; "
    + "".join(
        (f"shr.b32 c, $8, {2 * s}; and.b32 c, c, 0x03030303; " if s else "and.b32 c, $8, 0x03030303; ")
        + f"mad.lo.u32 u, c, 0x11, 0x40404040; prmt.b32 ${2 * s}, $9, $13, u; "
        + f"shr.b32 u, u, 16; prmt.b32 ${2 * s + 1}, $9, $13, u; "
        for s in range(4)
    )
    + "}"
)


def available() -> bool:
    return gluon is not None


def kernel():
    return _grad_input_ws_kernel


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    # Cached: querying device properties costs more than the host side of a launch.
    return torch.cuda.get_device_capability(index) == (9, 0)


def supports(grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """Whether this kernel takes ``grad [.., n] @ unpack(wq [n, kb])``: a Gluon Triton, an sm_90
    GPU (wgmma), 16-bit grads, one weight scale, and row strides TMA can describe (16-byte
    multiples; ``launch`` copies operands whose base is not 16-byte aligned)."""
    return (
        available()
        and grad.is_cuda
        and grad.dtype in (torch.bfloat16, torch.float16)
        and w_scale.numel() == 1
        and wq.shape[0] % 8 == 0
        and wq.shape[1] % 16 == 0
        and _sm90(grad.device.index)
    )


def require(grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> None:
    """ValueError naming what this kernel takes, unless it ``supports`` these operands."""
    if not supports(grad, wq, w_scale):
        raise ValueError(
            "the Gluon grad_input kernel takes 16-bit grads with N a multiple of 8, packed rows of whole "
            "16 bytes, one weight scale, on an sm_90 GPU with a Triton that has Gluon; got "
            f"{grad.dtype} grads, packed {tuple(wq.shape)}, {w_scale.numel()} scales on {grad.device}"
        )


if gluon is not None:
    CH = gl.constexpr(STEP)

    DECODE_PTX = gl.constexpr(DECODE_PTX_TEXT)
    DECODE_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 9))

    @gluon.jit
    def _decode(p, lo, hi, dtype: gl.constexpr):
        """Canonical bytes [R, C] (4 trits each) -> the trits as ``dtype`` [R, 4C] in *column
        order*: field s = 2y + x of byte 4W + 2e + h at column 16W + 8x + 4e + 2y + h. Each
        register of the asm is then two adjacent columns, stored as it is (K order would need
        32 more prmt per 16 bytes to repack the pairs); the epilogue maps the accumulator's
        rows back to K (``_store_transposed``)."""
        R: gl.constexpr = p.shape[0]
        C: gl.constexpr = p.shape[1]
        o0, o1, o2, o3 = gl.inline_asm_elementwise(
            DECODE_PTX,
            DECODE_CONSTRAINTS,
            [p, lo, hi],
            dtype=(gl.int16, gl.int16, gl.int16, gl.int16),
            is_pure=True,
            pack=4,
        )
        shape: gl.constexpr = [R, C // 4, 2, 2]  # [R, W, e, h]
        w = gl.join(
            gl.join(gl.reshape(o0, shape), gl.reshape(o1, shape)), gl.join(gl.reshape(o2, shape), gl.reshape(o3, shape))
        )  # [R, W, e, h, x, y]
        w = gl.permute(w, (0, 1, 4, 2, 5, 3))  # [R, W, x, e, y, h]
        return gl.reshape(w, [R, 4 * C]).to(dtype, bitcast=True)

    @gluon.jit
    def _store_transposed(acc, OUT, row0, col0, M, K, stride_o, num_warps: gl.constexpr):
        """Store ``acc`` [BK, BM] (rows in ``_decode``'s column order) transposed, at rows row0..
        and K columns col0.. of OUT: rows relabelled to K order in registers, then one layout
        conversion (through shared memory) to 16-byte runs along K."""
        BK: gl.constexpr = acc.shape[0]
        BM: gl.constexpr = acc.shape[1]
        acc = gl.permute(gl.reshape(acc, [BK // 16, 2, 2, 2, 2, BM]), (0, 2, 4, 3, 1, 5))  # [W, e, h, y, x, m]
        out = gl.permute(gl.reshape(acc, [BK, BM]), (1, 0)).to(OUT.dtype.element_ty)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BK // 8), BK // 8], [num_warps, 1], [1, 0])
        out = gl.convert_layout(out, layout)
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        offs_k = col0 + gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
        gl.store(
            OUT + offs_m[:, None].to(gl.int64) * stride_o + offs_k[None, :],
            out,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
        )

    @gluon.jit
    def _fetch(desc, coord0, coord1, bar, dst, pred):
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        tma_load(desc, [coord0, coord1], bar, dst, pred=pred)

    @gluon.jit
    def _mma_partition(
        g_desc, g_smem, b_smem, g_loaded, decoded, b_empty, pid_m, STEPS, BK: gl.constexpr, num_warps: gl.constexpr
    ):
        STAGES: gl.constexpr = g_smem.type.shape[0]
        SB: gl.constexpr = b_smem.type.shape[0]
        BM: gl.constexpr = g_smem.type.shape[1]
        # out^T [BK, BM] = trits^T [BK, CH] (the decoded tile read M-major) @ g^T [CH, BM]:
        # each warpgroup one m64 block of K rows at n = BM, so the trits are read once per step.
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16]
        )
        acc = gl.zeros([BK, BM], gl.float32, mma)
        for i in range(STEPS):
            s = i % STAGES
            mbarrier.wait(g_loaded.index(s), (i // STAGES) & 1)
            mbarrier.wait(decoded.index(i % SB), (i // SB) & 1)
            acc = warpgroup_mma(
                b_smem.index(i % SB).permute((1, 0)), g_smem.index(s).permute((1, 0)), acc, is_async=True
            )
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            # Step i - 1's MMA is done: its trits buffer and grad stage are free (at i = 0 the
            # stage refilled below, STAGES - 1, was never used).
            mbarrier.arrive(b_empty.index((i + SB - 1) % SB), count=1, pred=i > 0)
            j = i + STAGES - 1
            _fetch(g_desc, pid_m * BM, j * CH, g_loaded.index(j % STAGES), g_smem.index(j % STAGES), j < STEPS)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        return (acc,)  # a tuple: the default partition's results are flattened

    @gluon.jit
    def _decode_partition(
        p_desc, p_smem, b_smem, p_loaded, decoded, b_empty, pid_k, STEPS, ZERO, LO: gl.constexpr, HI: gl.constexpr
    ):
        STAGES: gl.constexpr = p_smem.type.shape[0]
        SB: gl.constexpr = b_smem.type.shape[0]
        BK: gl.constexpr = 4 * p_smem.type.shape[2]
        TK: gl.constexpr = BK // 64
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // TK, TK], [gl.num_warps(), 1], [1, 0])
        # The tables as tensors of a run-time zero, so that they stay in registers (immediates
        # are re-materialised before every prmt).
        zeros = gl.zeros([CH, BK // 4], gl.int32, layout) + ZERO
        lo = zeros + LO
        hi = zeros + HI
        dtype: gl.constexpr = b_smem.type.element_ty
        for i in range(STEPS):
            s = i % STAGES
            mbarrier.wait(p_loaded.index(s), (i // STAGES) & 1)
            mbarrier.wait(b_empty.index(i % SB), ((i // SB) & 1) ^ 1)
            b_smem.index(i % SB).store(_decode(p_smem.index(s).load(layout), lo, hi, dtype))
            fence_async_shared()  # the trits for the MMA (async proxy); the bytes' read before their refill
            mbarrier.arrive(decoded.index(i % SB), count=1)
            j = i + STAGES  # this stage's next use
            _fetch(p_desc, j * CH, pid_k * (BK // 4), p_loaded.index(s), p_smem.index(s), j < STEPS)

    @gluon.jit
    def _grad_input_ws_kernel(
        g_desc,
        p_desc,
        WS,
        OUT,
        M,
        K,
        STEPS,
        ZERO,
        stride_o,
        LO: gl.constexpr,
        HI: gl.constexpr,
        GROUP_K: gl.constexpr,
        STAGES: gl.constexpr,
        SB: gl.constexpr,
        DW: gl.constexpr,
        DREGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BM: gl.constexpr = g_desc.block_type.shape[0]
        BK: gl.constexpr = 4 * p_desc.block_type.shape[1]
        dtype: gl.constexpr = g_desc.block_type.element_ty
        pid_k, pid_m = grouped_tile(gl.program_id(0), gl.cdiv(K, BK), gl.cdiv(M, BM), GROUP_K)
        g_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, CH], g_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.int8, [STAGES, CH, BK // 4], p_desc.layout)
        b_smem = gl.allocate_shared_memory(dtype, [SB, CH, BK], gl.NVMMASharedLayout.get_default_for([CH, BK], dtype))
        g_loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        decoded = gl.allocate_shared_memory(gl.int64, [SB, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [SB, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(g_loaded.index(j), count=1)
            mbarrier.init(p_loaded.index(j), count=1)
        for j in gl.static_range(SB):
            mbarrier.init(decoded.index(j), count=1)
            mbarrier.init(b_empty.index(j), count=1)
        for j in gl.static_range(STAGES):  # bytes: STAGES steps ahead; grad tiles: STAGES - 1
            _fetch(p_desc, j * CH, pid_k * (BK // 4), p_loaded.index(j), p_smem.index(j), j < STEPS)
            _fetch(g_desc, pid_m * BM, j * CH, g_loaded.index(j), g_smem.index(j), j < gl.minimum(STEPS, STAGES - 1))
        (acc,) = gl.warp_specialize(
            [
                (_mma_partition, (g_desc, g_smem, b_smem, g_loaded, decoded, b_empty, pid_m, STEPS, BK, num_warps)),
                (_decode_partition, (p_desc, p_smem, b_smem, p_loaded, decoded, b_empty, pid_k, STEPS, ZERO, LO, HI)),
            ],
            [DW],
            [DREGS],
        )
        acc = acc * gl.load(WS).to(dtype).to(gl.float32)
        _store_transposed(acc, OUT, pid_m * BM, pid_k * BK, M, K, stride_o, num_warps)

    @functools.lru_cache(maxsize=None)
    def _smem_layout(rows: int, cols: int, dtype):
        """The shared-memory layout TMA writes a box in (building one costs host time)."""
        return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` with the 16-byte aligned base and row stride TMA needs, copied if not."""
    aligned = t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
    return t if aligned else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def descriptors(g: torch.Tensor, p8: torch.Tensor, BM: int, BK: int):
    """TMA descriptors: grad tiles [BM, STEP] and packed-byte tiles [STEP rows of N, BK / 4]."""
    (m, n), gdt = g.shape, gl.bfloat16 if g.dtype == torch.bfloat16 else gl.float16
    g_desc = TensorDescriptor(g, [m, n], [g.stride(0), 1], [BM, STEP], _smem_layout(BM, STEP, gdt))
    p_desc = TensorDescriptor(
        p8, list(p8.shape), [p8.stride(0), 1], [STEP, BK // 4], _smem_layout(STEP, BK // 4, gl.int8)
    )
    return g_desc, p_desc


@functools.lru_cache(maxsize=None)
def constexprs(dtype: str, STAGES: int, SB: int, GROUP_K: int) -> dict:
    """The kernel's compile-time arguments for ``dtype`` grads ("bf16" / "fp16"), as ``launch``
    passes them (``tools/sass.py`` compiles with the same)."""
    lo, hi = ONE_TABLES[dtype]
    return dict(
        LO=int32(lo),
        HI=int32(hi),
        GROUP_K=GROUP_K,
        STAGES=STAGES,
        SB=SB,
        DW=DECODE_WARPS,
        DREGS=DECODE_REGS,
        num_warps=MMA_WARPS,
    )


def launch(
    g: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor,
    BM: int,
    BK: int,
    STAGES: int,
    SB: int,
    GROUP_K: int,
):
    """``out [m, k] = g [m, n] @ (unpack(wq [n, kb]) * w_scale)`` (operands as ``supports`` takes)."""
    (m, n), k = g.shape, out.shape[1]
    g, p8 = _tma_ready(g), _tma_ready(wq).view(torch.int8)
    g_desc, p_desc = descriptors(g, p8, BM, BK)
    grid = (-(-m // BM) * -(-k // BK),)
    options = constexprs("bf16" if g.dtype == torch.bfloat16 else "fp16", STAGES, SB, GROUP_K)
    compiled = _grad_input_ws_kernel[grid](
        g_desc, p_desc, w_scale, out, m, k, -(-n // STEP), 0, out.stride(0), **options, maxnreg=MAX_REGS
    )
    tuning.dump_source(
        _grad_input_ws_kernel, compiled, dict(BM=BM, BK=BK, STAGES=STAGES, SB=SB, GROUP_K=GROUP_K, grad=str(g.dtype))
    )
    return compiled
