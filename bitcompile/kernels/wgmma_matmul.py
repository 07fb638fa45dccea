"""Packed-ternary matmul for a few tokens, written in Gluon so the tensor-core wait is explicit.

Triton waits for the warpgroup MMA right after every dot whose operand is computed in the
loop, so in ``ternary_matmul._gemm_kernel`` a program decodes block i + 1 only after block
i's MMA has finished. Here a step's MMAs (four per 256-trit block, one per quarter) stay in
flight (``warpgroup_mma_wait(4 NB)``) while the program decodes the next step's NB blocks.

The tile is out^T [BN weight rows, BM tokens]; the trits are the MMA's register operand A.
The packed bytes are read from shared memory straight into A's register layout
(``DotOperandLayout``, k_width 4): the thread holding A[n, 4w : 4w + 4] of quarter g holds
packed word w of row n, whose quarter g is exactly those four trits ("nibbles" order,
``bitcompile.numerics.packing``), so the decode is elementwise (``common.kblock_quarter_from``)
and no data moves between threads. Weights and activations arrive by TMA in a STAGES-deep
ring. M <= BM tokens (one token tile); optional split-K over the steps, summed as in the
Triton GEMM (``common.split_k_total``). M=16 8192^2: ~9.3 us on the H100, 5.3x bf16 cuBLAS
(docs/kernels.md).

``SYNC`` (launch configurations of kind ``mma_sync``, M <= 16): the same ring and decode with
``mma.sync`` m16n8k32 per warp instead: 8 tokens fill the MMA's N (wgmma's is 16 at least),
and the step has no warpgroup arrive/wait nor wgmma's shared-memory descriptors (the
activations come to registers by ``ldmatrix``; at batch 8 the warpgroup form's step was 243
instructions, this one 175). Even and odd quarters accumulate apart, two dependency chains.
The warps read the ring independently, so a CTA barrier frees a stage before TMA refills it.
"""

from __future__ import annotations

import functools

import torch

from bitcompile.kernels.common import (
    PAIR_TABLE_WORDS,
    grid_dependency_launch_dependents,
    grid_dependency_wait,
    kblock_quarter_from,
    matmul_epilogue,
    split_k_total,
)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon: the Triton kernels serve every M
    gluon = None

MAX_M = 64  # one token tile: the MMA's N
KINDS = ("wgmma", "mma_sync")  # the launch configurations' "kernel" values this module serves
QUARTER = 64  # bytes of one 256-trit block per weight row: one quarter of trits, one MMA's K
TABLE_ROWS = 256  # copies of each prmt table word in memory: one per weight row of a tile (BN <= 256)


def available() -> bool:
    return gluon is not None


if gluon is not None:
    Q = gl.constexpr(QUARTER)
    TR = gl.constexpr(TABLE_ROWS)
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed in Triton 3.7
    cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in Triton 3.7

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton >= 3.7 (3.6: private)

        @gluon.jit
        def _tiles(smem, shape: gl.constexpr, layout: gl.constexpr):
            return smem.reinterpret(gl.int8, shape, layout)
    else:

        @gluon.jit
        def _tiles(smem, shape: gl.constexpr, layout: gl.constexpr):
            return smem._reinterpret(gl.int8, shape, layout)

    @gluon.jit
    def _chunk(tiles, first, j: gl.constexpr, PER: gl.constexpr):
        """The j-th 64-byte column tile of a step's tiles (PER of them side by side per tile)."""
        return tiles.index(first + j // PER).slice((j % PER) * Q, Q, dim=1)

    @gluon.jit
    def _fetch(x_desc, p_desc, p_smem, x_smem, ready, step, stage, pred):
        """TMA, two copies per step: the packed blocks of this program's rows ([chunks, BN, W])
        and their activations ([chunks, BM, W])."""
        _fetch_weights(x_desc, p_desc, p_smem, ready, step, stage, pred)
        _fetch_activations(x_desc, x_smem, ready, step, stage, pred)

    @gluon.jit
    def _fetch_weights(x_desc, p_desc, p_smem, ready, step, stage, pred):
        """The step's packed blocks; its barrier expects the activations' bytes too."""
        bar = ready.index(stage)
        mbarrier.expect(bar, p_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=pred)
        row = gl.program_id(0) * p_desc.block_type.shape[1]
        tma_load(p_desc, [step * p_desc.block_type.shape[0], row, 0], bar, p_smem.index(stage), pred=pred)

    @gluon.jit
    def _fetch_activations(x_desc, x_smem, ready, step, stage, pred):
        tma_load(x_desc, [step * x_desc.block_type.shape[0], 0, 0], ready.index(stage), x_smem.index(stage), pred=pred)

    @gluon.jit
    def _wgmma_kernel(
        x_desc,
        p_desc,
        TABLE,
        C,
        XS,
        WS,
        BIAS,
        RES,
        PARTIAL,
        COUNT,
        M,
        N,
        STEPS,
        stride_cm,
        stride_rm,
        STAGES: gl.constexpr,
        SPLIT_K: gl.constexpr,
        EPILOGUE: gl.constexpr,
        PER_CHANNEL: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        ACTIVATION: gl.constexpr,
        HAS_RES: gl.constexpr,
        SYNC: gl.constexpr,
        num_warps: gl.constexpr,
        PDL: gl.constexpr = False,
    ):
        W: gl.constexpr = p_desc.block_type.shape[2]  # bytes per chunk: 64 or 128
        PER: gl.constexpr = W // Q  # quarters (activations) or blocks (packed rows) per chunk
        PC: gl.constexpr = p_desc.block_type.shape[0]  # packed chunks per step
        XC: gl.constexpr = x_desc.block_type.shape[0]
        NB: gl.constexpr = PC * PER  # 256-trit blocks per step
        BN: gl.constexpr = p_desc.block_type.shape[1]
        BM: gl.constexpr = x_desc.block_type.shape[1]
        if SYNC:  # mma.sync m16n8k32 per warp: BM = 8 tokens is one MMA, no padding
            mma: gl.constexpr = gl.NVMMADistributedLayout(
                version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
            )
        else:  # wgmma m64nBMk32 per warpgroup
            mma: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 32]
            )
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
        # The rings as TMA writes them ([stage, chunk, row, W bytes]) and as 2-D tiles: the 3-D
        # tiles are whole swizzle atoms stacked, so tile t is bytes [t * rows * W, ...).
        p_smem = gl.allocate_shared_memory(gl.int8, [STAGES, PC, BN, W], p_desc.layout)
        x_smem = gl.allocate_shared_memory(gl.int8, [STAGES, XC, BM, W], x_desc.layout)
        tile: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=W, element_bitwidth=8, rank=2)
        p_tiles = _tiles(p_smem, [STAGES * PC, BN, W], tile)
        x_tiles = _tiles(x_smem, [STAGES * XC, BM, W], tile)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)
        # Split-K: program pid_k takes a run of steps.
        pid_k = gl.program_id(1)
        per = gl.cdiv(STEPS, SPLIT_K)
        first = pid_k * per
        steps = gl.minimum(STEPS - first, per)
        if PDL:  # (tuning.pdl) the ring's first weights before waiting for the activations' producer
            grid_dependency_launch_dependents()
            for j in gl.static_range(STAGES - 1):
                _fetch_weights(x_desc, p_desc, p_smem, ready, first + j, j, j < steps)
            grid_dependency_wait()
            for j in gl.static_range(STAGES - 1):
                _fetch_activations(x_desc, x_smem, ready, first + j, j, j < steps)
        else:
            for j in gl.static_range(STAGES - 1):
                _fetch(x_desc, p_desc, p_smem, x_smem, ready, first + j, j, j < steps)

        acc = gl.zeros([BN, BM], gl.int32, mma)
        acc_odd = gl.zeros([BN, BM], gl.int32, mma)  # SYNC: odd quarters, two dependency chains
        rows = gl.arange(0, BN, layout=gl.SliceLayout(1, a_layout))
        # The decode's prmt tables, one copy per row so that each stays in an ordinary register.
        zeros = gl.zeros([BN, Q], gl.int32, a_layout)
        ta = gl.load(TABLE + rows)[:, None] + zeros
        tb = gl.load(TABLE + TR + rows)[:, None] + zeros
        ua = gl.load(TABLE + 2 * TR + rows)[:, None] + zeros
        ub = gl.load(TABLE + 3 * TR + rows)[:, None] + zeros
        for i in range(steps):
            stage = i % STAGES
            mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
            for b in gl.static_range(NB):
                p = _chunk(p_tiles, stage * PC, b, PER).load(a_layout)
                for g in gl.static_range(4):
                    x = _chunk(x_tiles, stage * XC, 4 * b + g, PER).permute((1, 0))
                    t = kblock_quarter_from(p, ta, tb, ua, ub, g)
                    if not SYNC:
                        acc = warpgroup_mma(t, x, acc, is_async=True)
                    elif g % 2 == 0:
                        acc = mma_v2(t, x.load(b_layout), acc)
                    else:
                        acc_odd = mma_v2(t, x.load(b_layout), acc_odd)
            # Step i - 1's MMAs are done (SYNC: every warp's, which read the ring in registers
            # before their MMAs): its ring stage is free again.
            if SYNC:
                cta_barrier()
            else:
                acc = warpgroup_mma_wait(num_outstanding=4 * NB, deps=[acc])
            _fetch(
                x_desc,
                p_desc,
                p_smem,
                x_smem,
                ready,
                first + i + STAGES - 1,
                (i + STAGES - 1) % STAGES,
                i + STAGES - 1 < steps,
            )
        if SYNC:
            acc += acc_odd
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for j in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(j))

        # C rows are tokens: store along the weight rows (dim 0 of acc), which are contiguous in C.
        out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        out = gl.convert_layout(gl.permute(acc, (1, 0)), out_layout)
        offs_m = gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
        offs_n = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
        last = True
        if SPLIT_K > 1:
            at = offs_m[:, None] * BN + (offs_n - gl.program_id(0) * BN)[None, :]
            out, last = split_k_total(out, at, PARTIAL, COUNT, gl.program_id(0), pid_k, BM * BN, SPLIT_K, True, True)
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


def supports(m: int, k: int, a: torch.Tensor) -> bool:
    """Whether the Gluon kernel can take this launch: one token tile, activation rows of whole
    64-byte chunks (the TMA view in :func:`descriptors`), a 16-byte aligned base."""
    return available() and a.is_cuda and m <= MAX_M and k % QUARTER == 0 and a.data_ptr() % 16 == 0


_tables: dict = {}


def prmt_tables(device: torch.device) -> torch.Tensor:
    """The four prmt table words (``common.PAIR_TABLE_WORDS``), TABLE_ROWS copies each, in device
    memory (``common.KBLOCK_PTX_T0``)."""
    if device not in _tables:
        _tables[device] = torch.tensor(PAIR_TABLE_WORDS, dtype=torch.int32, device=device).repeat_interleave(TABLE_ROWS)
    return _tables[device]


def step_count(kpb: int, NB: int) -> int:
    """Steps of NB 256-trit blocks over K-blocked rows of ``kpb`` bytes (the last may be partial)."""
    return -(-kpb // (QUARTER * NB))


def token_tile(m: int, sync: bool = False) -> int:
    """Tokens per tile: the MMA's N (wgmma: 16 and up; mma.sync: 8 and up)."""
    return max(8 if sync else 16, 1 << (m - 1).bit_length())  # not triton.next_power_of_2: ~1.5 us per host call


def fits(m: int, BN: int, NB: int, STAGES: int, sync: bool = False, **_) -> bool:
    """Whether a configuration's rings fit the H100's shared memory (227 KB per CTA) at M rows."""
    return STAGES * NB * QUARTER * (BN + 4 * token_tile(m, sync)) + 1024 <= 232448


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple):
    """The shared-memory layout TMA writes a box in (building one takes ~5 us of host time)."""
    return gl.NVMMASharedLayout.get_default_for(list(box), gl.int8)


def descriptors(a2: torch.Tensor, p: torch.Tensor, BN: int, NB: int, WIDE: bool, sync: bool = False):
    """TMA descriptors of the activations ``a2 [m, k]`` and the int8 view of the packed weights
    ``p [n, kpb]``, each as [chunk, row, W bytes] (see :func:`launch`)."""
    (m, k), (n, kpb) = a2.shape, p.shape
    w = 2 * QUARTER if WIDE and NB % 2 == 0 and k % 512 == 0 else QUARTER
    x_box, p_box = (4 * NB * QUARTER // w, token_tile(m, sync), w), (NB * QUARTER // w, BN, w)
    x_desc = TensorDescriptor(a2, [k // w, m, w], [w, a2.stride(0), 1], list(x_box), _smem_layout(x_box))
    p_desc = TensorDescriptor(p, [kpb // w, n, w], [w, p.stride(0), 1], list(p_box), _smem_layout(p_box))
    return x_desc, p_desc


def launch(
    a2: torch.Tensor,
    blocked: torch.Tensor,
    c: torch.Tensor,
    tail: tuple,
    split_k_buffers: tuple,
    m: int,
    n: int,
    flags: dict,
    BN: int,
    NB: int,
    STAGES: int,
    SPLIT_K: int,
    WIDE: bool = False,
    num_warps: int = 4,
    sync: bool = False,
    pdl: bool = False,
):
    """Launch on int8 activations ``a2 [m, k]`` and K-blocked packed weights ``blocked [n, kpb]``
    (``split_k_buffers``: partial tiles and arrival counters, as ``ternary_matmul`` keeps them).
    Both are described to TMA as [chunk, row, W bytes], a chunk being 64 bytes (a quarter of
    activations, one block of a packed row) or, WIDE where K is whole 512-trit chunks, 128
    (half the box rows; ~2% faster at M=16 8192^2). Either way one copy per step brings its NB
    blocks and one their activations, as 2-D tiles the MMA reads (every TMA copy costs the CTA
    a barrier). ``sync``: the mma.sync form (8-token tiles, see the module doc). ``pdl``:
    programmatic dependent launch (``tuning.pdl``): the first STAGES - 1 steps' weights are
    requested before the wait for the kernel before this one, their activations after it."""
    x_desc, p_desc = descriptors(a2, blocked.view(torch.int8), BN, NB, WIDE, sync)
    xs, ws, bias, res = tail
    return _wgmma_kernel[(-(-n // BN), SPLIT_K)](
        x_desc,
        p_desc,
        prmt_tables(a2.device),
        c,
        xs,
        ws,
        bias,
        res,
        *split_k_buffers,
        m,
        n,
        step_count(blocked.shape[1], NB),
        c.stride(0),
        res.stride(0),
        STAGES=STAGES,
        SPLIT_K=SPLIT_K,
        SYNC=sync,
        num_warps=num_warps,
        **flags,
        **(dict(PDL=True, launch_pdl=True) if pdl else {}),
    )
