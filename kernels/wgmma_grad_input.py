"""The exact-STE input gradient ``grad [M, N] @ (trits [N, K] * s_w)`` in Gluon, so the
tensor cores are not waited on after every dot.

``grad_input._grad_input_t_kernel`` computes the transposed tile ``trits^T @ grad^T`` with the
decoded trits as the MMA's register operand; Triton then waits for each dot's MMAs before the
next dot's decode may overwrite those registers (SASS: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after
every dot), so decode and tensor cores take turns (0.63x cuBLAS on that GEMM, round 16). Here
each quarter's MMA stays in flight while the next quarter is decoded into other registers
(``warpgroup_mma_wait(1)``), and the grad tiles arrive by TMA in a STAGES-deep ring.

Operands as the Triton kernel's: ``P = layout.transposed_kblocked(W, order="fields")``
``[K, NPB]``, byte j of block b of row k holding at bits 2i the trit of weight row
n = 256 b + 64 i + j. A step is one 256-row block of N: one TMA copy of the packed
[BK, 64] bytes and one of the grad [4, BM, 64] (four 64-wide chunks of N).
"""
from __future__ import annotations

import functools

import torch

from bitcompile.kernels.wgmma_matmul import available

if available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from bitcompile.kernels.wgmma_matmul import _tiles, _tma_load

CHUNK = 64  # N per MMA (one quarter of a 256-row block): 128 bytes of grad per token row

# Four trit codes (bytes of $2, code = trit + 1 at bit SHIFT) -> four 16-bit floats (-1, 0, 1)
# in $0 (elements 0, 1) and $1 (2, 3): byte selectors (c, 4 + c) per element into the low /
# high bytes of the value by code ($3 / $7: ``grad_input.ONE_TABLES``, registers).
TRIT_QUAD_PTX = ("{ .reg .b32 t, u; shr.b32 t, $2, SHIFT; and.b32 t, t, 0x03030303; "
                 "mad.lo.u32 u, t, 0x11, 0x4040; prmt.b32 $0, $3, $7, u; "
                 "shr.b32 t, t, 16; mad.lo.u32 u, t, 0x11, 0x4040; prmt.b32 $1, $3, $7, u; }")
_QUAD = [TRIT_QUAD_PTX.replace("SHIFT", str(2 * q)) for q in range(4)]


if available():
    QUAD0, QUAD1, QUAD2, QUAD3 = (gl.constexpr(a) for a in _QUAD)

    @gluon.jit
    def _trits(p, lo, hi, Q: gl.constexpr, dtype: gl.constexpr):
        """Quarter Q's trits (codes at bit 2Q of the int8 bytes ``p``) as ``dtype`` (+-1.0 or 0)."""
        C: gl.constexpr = "=r,=r,r" + ",r" * 8
        if Q == 0:
            bits = gl.inline_asm_elementwise(QUAD0, C, [p, lo, hi], dtype=gl.int16, is_pure=True, pack=4)
        elif Q == 1:
            bits = gl.inline_asm_elementwise(QUAD1, C, [p, lo, hi], dtype=gl.int16, is_pure=True, pack=4)
        elif Q == 2:
            bits = gl.inline_asm_elementwise(QUAD2, C, [p, lo, hi], dtype=gl.int16, is_pure=True, pack=4)
        else:
            bits = gl.inline_asm_elementwise(QUAD3, C, [p, lo, hi], dtype=gl.int16, is_pure=True, pack=4)
        return bits.to(dtype, bitcast=True)

    @gluon.jit
    def _decode(p_tile, lo, hi, a_layout: gl.constexpr, dtype: gl.constexpr):
        """A step's four quarters of trits as MMA register operands, from its packed [BK, 64] tile."""
        p = p_tile.load(a_layout)
        return (_trits(p, lo, hi, 0, dtype), _trits(p, lo, hi, 1, dtype), _trits(p, lo, hi, 2, dtype),
                _trits(p, lo, hi, 3, dtype))

    @gluon.jit
    def _fetch(g_desc, p_desc, g_smem, p_smem, ready, step, stage, pid_m, pid_k, pred):
        bar = ready.index(stage)
        mbarrier.expect(bar, g_desc.block_type.nbytes + p_desc.block_type.nbytes, pred=pred)
        _tma_load(g_desc, [4 * step, pid_m * g_desc.block_type.shape[1], 0], bar, g_smem.index(stage), pred=pred)
        _tma_load(p_desc, [step, pid_k * p_desc.block_type.shape[1], 0], bar, p_smem.index(stage), pred=pred)

    @gluon.jit
    def _wgmma_grad_input_kernel(g_desc, p_desc, WS, OUT, M, K, STEPS, ZERO, stride_o,
                                 LO: gl.constexpr, HI: gl.constexpr, GROUP_K: gl.constexpr, STAGES: gl.constexpr,
                                 num_warps: gl.constexpr):
        BM: gl.constexpr = g_desc.block_type.shape[1]  # tokens: the MMA's N
        BK: gl.constexpr = p_desc.block_type.shape[1]  # output columns: the MMA's M
        C: gl.constexpr = g_desc.block_type.shape[2]
        dtype: gl.constexpr = g_desc.block_type.element_ty
        # Grouped order: GROUP_K column tiles share their grad rows in L2.
        tiles_k = gl.cdiv(K, BK)
        tiles_m = gl.cdiv(M, BM)
        pid = gl.program_id(0)
        group = pid // (GROUP_K * tiles_m)
        first_k = group * GROUP_K
        size = gl.minimum(tiles_k - first_k, GROUP_K)
        pid_k = first_k + (pid % (GROUP_K * tiles_m)) % size
        pid_m = (pid % (GROUP_K * tiles_m)) // size

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        g_smem = gl.allocate_shared_memory(dtype, [STAGES, 4, BM, C], g_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.int8, [STAGES, 1, BK, C], p_desc.layout)
        # The rings as 2-D tiles (whole swizzle atoms stacked: tile t is bytes [t * rows * width, ...)).
        g_tiles = _tiles(g_smem, [STAGES * 4, BM, C],
                         gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2), dtype)
        p_tiles = _tiles(p_smem, [STAGES, BK, C], gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8,
                                                                       rank=2))
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)
        for j in gl.static_range(STAGES - 1):
            _fetch(g_desc, p_desc, g_smem, p_smem, ready, j, j, pid_m, pid_k, j < STEPS)

        # The byte-permute tables, made from a run-time zero so that they stay in registers.
        zeros = gl.zeros([BK, C], gl.int32, a_layout) + ZERO
        lo = zeros + LO
        hi = zeros + HI
        acc = gl.zeros([BK, BM], gl.float32, mma)
        mbarrier.wait(ready.index(0), 0)
        a0, a1, a2, a3 = _decode(p_tiles.index(0), lo, hi, a_layout, dtype)
        for i in range(STEPS):
            stage = i % STAGES
            acc = warpgroup_mma(a0, g_tiles.index(4 * stage).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a1, g_tiles.index(4 * stage + 1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a2, g_tiles.index(4 * stage + 2).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a3, g_tiles.index(4 * stage + 3).permute((1, 0)), acc, is_async=True)
            # Step i - 1's MMAs are done (waited below last time): its ring stage is free again.
            _fetch(g_desc, p_desc, g_smem, p_smem, ready, i + STAGES - 1, (i + STAGES - 1) % STAGES, pid_m, pid_k,
                   i + STAGES - 1 < STEPS)
            # Step i + 1's trits are decoded while step i's MMAs run (the last step decodes its own
            # bytes again, unused), quarter q once step i's quarter q is done with its registers.
            # Nothing is in flight across the loop's back edge: ptxas serialises every MMA of a
            # loop whose accumulator is in flight there (C7515).
            nxt = gl.minimum(i + 1, STEPS - 1)
            mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
            p = p_tiles.index(nxt % STAGES).load(a_layout)
            n0 = _trits(p, lo, hi, 0, dtype)
            acc = warpgroup_mma_wait(num_outstanding=3, deps=[acc])
            a0 = n0
            n1 = _trits(p, lo, hi, 1, dtype)
            acc = warpgroup_mma_wait(num_outstanding=2, deps=[acc])
            a1 = n1
            n2 = _trits(p, lo, hi, 2, dtype)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            a2 = n2
            n3 = _trits(p, lo, hi, 3, dtype)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            a3 = n3
        for j in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(j))

        # The one weight scale, rounded to the grad dtype as the reference's operand trit * s is.
        acc = acc * gl.load(WS).to(dtype).to(gl.float32)
        out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        out = gl.convert_layout(gl.permute(acc, (1, 0)), out_layout)  # [BM, BK]: rows along K in OUT
        offs_m = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
        offs_k = pid_k * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, out_layout))
        gl.store(OUT + offs_m[:, None].to(gl.int64) * stride_o + offs_k[None, :], out.to(OUT.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def supports(grad: torch.Tensor, n: int, per_channel: bool) -> bool:
    """Whether a launch can take this kernel: 16-bit grads, one weight scale, grad rows of whole
    64-wide chunks (the TMA view below) and a 16-byte aligned base."""
    return (available() and grad.is_cuda and grad.dtype in (torch.bfloat16, torch.float16) and not per_channel
            and n % CHUNK == 0 and grad.data_ptr() % 16 == 0)


def fits(BM: int, BK: int, STAGES: int, **_) -> bool:
    """Whether the ring fits the H100's shared memory (227 KB per CTA)."""
    return STAGES * (4 * BM * CHUNK * 2 + BK * CHUNK) + 1024 <= 232448


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple, wide: bool):
    return gl.NVMMASharedLayout.get_default_for(list(box), gl.bfloat16 if wide else gl.int8)


def descriptors(g: torch.Tensor, pt: torch.Tensor, BM: int, BK: int):
    """TMA views: the grad ``g [m, n]`` as [n / 64, m, 64] (a step's box: 4 chunks of BM tokens),
    the packed bytes ``pt [k, npb]`` as [npb / 64, k, 64] (a step's box: one block of BK rows)."""
    (m, n), (k, npb) = g.shape, pt.shape
    g_box, p_box = (4, BM, CHUNK), (1, BK, CHUNK)
    p8 = pt.view(torch.int8)
    return (TensorDescriptor(g, [n // CHUNK, m, CHUNK], [CHUNK, g.stride(0), 1], list(g_box),
                             _smem_layout(g_box, True)),
            TensorDescriptor(p8, [npb // CHUNK, k, CHUNK], [CHUNK, p8.stride(0), 1], list(p_box),
                             _smem_layout(p_box, False)))


def launch(g: torch.Tensor, pt: torch.Tensor, ws: torch.Tensor, out: torch.Tensor, lo: int, hi: int, BM: int,
           BK: int, STAGES: int, GROUP_K: int = 8, num_warps: int = 4):
    """``out [m, k] = g [m, n] @ trits`` from ``pt = transposed_kblocked(W, k, order="fields")``
    ``[k, npb]``; ``lo, hi``: ``grad_input.ONE_TABLES`` of g's dtype."""
    (m, n), (k, npb) = g.shape, pt.shape
    g_desc, p_desc = descriptors(g, pt, BM, BK)
    grid = (-(-m // BM) * -(-k // BK),)
    return _wgmma_grad_input_kernel[grid](g_desc, p_desc, ws, out, m, k, npb // CHUNK, 0, out.stride(0),
                                          LO=signed(lo), HI=signed(hi), GROUP_K=GROUP_K, STAGES=STAGES,
                                          num_warps=num_warps)


def signed(word: int) -> int:
    """A 32-bit table word as the int32 constant that holds its bits."""
    return word - (1 << 32) if word >= 1 << 31 else word
