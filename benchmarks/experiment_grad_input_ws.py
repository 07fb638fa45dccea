"""Experiment (round 18, not wired in): the exact-STE input gradient, warp-specialised, in Gluon.

out [BM, BK] = g [BM, N] @ trits [N, BK] * s_w, one weight scale, 16-bit grads, both MMA operands
in shared memory. The shipped kernels (``kernels/grad_input.py``) reach 0.59-0.64x cuBLAS on this
GEMM: with the trits as the MMA's register operand, ptxas sinks their decode below the MMA
wait, so decode and tensor cores take turns (rounds 5 and 16). Here the partitions run side by
side:
  * 8 MMA warps (the default partition) issue a step's SS wgmma as soon as its grad tile
    (TMA, STAGES deep) and trits (SB deep) are ready, keep one step in flight, release step
    i - 1's buffers and fetch the grad tile STAGES - 1 steps ahead;
  * 4 decode warps turn each step's canonical bytes (TMA, STAGES deep) into 16-bit +-1/0 with
    one ``prmt`` per two trits and store them for the MMA (``fence_async_shared``, mbarrier).
12 warps in all: ptxas gives every warp the launch's register limit (168), which the 64x128 x2
fp32 accumulator needs (16 warps cap it at 128: C7602).

H100 (round 18, ``.notes/kernels.md``): bit-equal to the shipped kernel at every QAT-sized
shape; 0.73-0.79x cuBLAS, 1.16-1.32x the shipped kernel (8192x4096^2 457 vs 581 us, 8192^3
1772 vs 2252). The decode warps are the limit (BK 256 tiles, twice the decode per MMA step,
are slower). Not wired in: traced (Inductor) launches take Triton kernels only, so the compiled
QAT path needs an opaque op for it; and the decode's repacking PRMTs (canonical bytes give
trit pairs 4 apart in K) would go with a K-blocked "fields" layout.

    python benchmarks/experiment_grad_input_ws.py static   # sm_90 compile + SASS profile (Triton 3.6), no GPU
    python benchmarks/experiment_grad_input_ws.py          # H100: exactness and timing vs the shipped kernel, cuBLAS
"""
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bitcompile.kernels.common import grouped_tile, int32  # noqa: E402
from bitcompile.kernels.wgmma_matmul import tma_load as _tma_load  # noqa: E402

CH = gl.constexpr(64)  # reduction rows (of N) per step

# The four trits at bit SHIFT of the bytes of $8 (code = trit + 1) -> 16-bit values in $0
# (bytes 0, 1) and $1 (bytes 2, 3): selectors (c, 4 + c) into the tables $9 (low bytes of the
# value by code) and $13 (high bytes), as grad_input.TRIT_PAIR_PTX. Four shifts: 8 outputs.
_QUAD = ("and.b32 c, t, 0x03030303; mad.lo.u32 u, c, 0x11, 0x4040; prmt.b32 $O0, $9, $13, u; "
         "shr.b32 c, c, 16; mad.lo.u32 u, c, 0x11, 0x4040; prmt.b32 $O1, $9, $13, u; ")
DECODE_PTX = gl.constexpr("{ .reg .b32 t, u, c; mov.b32 t, $8; " + "".join(
    (f"shr.b32 t, $8, {2 * s}; " if s else "") + _QUAD.replace("O0", str(2 * s)).replace("O1", str(2 * s + 1))
    for s in range(4)) + "}")

DECODE_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 9))


@gluon.jit
def _decode(p, lo, hi, dtype: gl.constexpr):
    """Canonical bytes [R, C] (4 trits each) -> the trits as ``dtype`` [R, 4C] in K order."""
    o0, o1, o2, o3 = gl.inline_asm_elementwise(DECODE_PTX, DECODE_CONSTRAINTS, [p, lo, hi],
                                               dtype=(gl.int16, gl.int16, gl.int16, gl.int16), is_pure=True, pack=4)
    w = gl.join(gl.join(o0, o1), gl.join(o2, o3))  # [R, C, i, t]: field 2t + i
    w = gl.permute(w, (0, 1, 3, 2))
    R: gl.constexpr = p.shape[0]
    C: gl.constexpr = p.shape[1]
    return gl.reshape(w, [R, 4 * C]).to(dtype, bitcast=True)


def descriptors(g, wq, BM, BK):
    gdt = gl.bfloat16 if g.dtype == torch.bfloat16 else gl.float16
    p8 = wq.view(torch.int8)
    g_desc = TensorDescriptor(g, list(g.shape), [g.stride(0), 1], [BM, CH.value],
                              gl.NVMMASharedLayout.get_default_for([BM, CH.value], gdt))
    p_desc = TensorDescriptor(p8, list(p8.shape), [p8.stride(0), 1], [CH.value, BK // 4],
                              gl.NVMMASharedLayout.get_default_for([CH.value, BK // 4], gl.int8))
    return g_desc, p_desc


@gluon.jit
def _fetch_one(desc, coord0, coord1, bar, dst, pred):
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    _tma_load(desc, [coord0, coord1], bar, dst, pred=pred)


@gluon.jit
def _ws_mma(g_desc, g_smem, b_smem, g_loaded, decoded, b_empty, pid_m, STEPS, BK: gl.constexpr,
            num_warps: gl.constexpr):
    STAGES: gl.constexpr = g_smem.type.shape[0]
    SB: gl.constexpr = b_smem.type.shape[0]
    BM: gl.constexpr = g_smem.type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BK, 16])
    acc = gl.zeros([BM, BK], gl.float32, mma)
    for i in range(STEPS):
        s = i % STAGES
        mbarrier.wait(g_loaded.index(s), (i // STAGES) & 1)
        mbarrier.wait(decoded.index(i % SB), (i // SB) & 1)
        acc = warpgroup_mma(g_smem.index(s), b_smem.index(i % SB), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        # Step i - 1's MMA is done: its trits buffer and grad stage are free (at i = 0 the stage
        # refilled below, STAGES - 1, was never used).
        mbarrier.arrive(b_empty.index((i + SB - 1) % SB), count=1, pred=i > 0)
        j = i + STAGES - 1
        _fetch_one(g_desc, pid_m * BM, j * CH, g_loaded.index(j % STAGES), g_smem.index(j % STAGES), j < STEPS)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    return (acc,)  # a tuple: the default partition's results are flattened


@gluon.jit
def _ws_decode(p_desc, p_smem, b_smem, p_loaded, decoded, b_empty, pid_k, STEPS, ZERO, LO: gl.constexpr,
               HI: gl.constexpr):
    STAGES: gl.constexpr = p_smem.type.shape[0]
    SB: gl.constexpr = b_smem.type.shape[0]
    BK: gl.constexpr = 4 * p_smem.type.shape[2]
    TK: gl.constexpr = BK // 64
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // TK, TK], [gl.num_warps(), 1], [1, 0])
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
        _fetch_one(p_desc, j * CH, pid_k * (BK // 4), p_loaded.index(s), p_smem.index(s), j < STEPS)


@gluon.jit
def _grad_input_ws_kernel(g_desc, p_desc, WS, OUT, M, K, STEPS, ZERO, stride_o, LO: gl.constexpr, HI: gl.constexpr,
                          GROUP_K: gl.constexpr, STAGES: gl.constexpr, SB: gl.constexpr, DW: gl.constexpr,
                          DREGS: gl.constexpr, num_warps: gl.constexpr):
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
        _fetch_one(p_desc, j * CH, pid_k * (BK // 4), p_loaded.index(j), p_smem.index(j), j < STEPS)
        _fetch_one(g_desc, pid_m * BM, j * CH, g_loaded.index(j), g_smem.index(j), j < gl.minimum(STEPS, STAGES - 1))
    acc, = gl.warp_specialize([(_ws_mma, (g_desc, g_smem, b_smem, g_loaded, decoded, b_empty, pid_m, STEPS, BK,
                                          num_warps)),
                               (_ws_decode, (p_desc, p_smem, b_smem, p_loaded, decoded, b_empty, pid_k, STEPS, ZERO,
                                             LO, HI))], [DW], [DREGS])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BK, 16])
    acc = acc * gl.load(WS).to(dtype).to(gl.float32)
    offs_m = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    offs_k = pid_k * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, mma))
    gl.store(OUT + offs_m[:, None].to(gl.int64) * stride_o + offs_k[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def launch_ws(g, wq, ws, out, BM=256, BK=128, STAGES=4, SB=3, DW=4, DREGS=64, GROUP_K=16, num_warps=8,
              maxnreg=168):
    """``out [m, k] = g [m, n] @ (unpack(wq) * ws)`` (defaults: the best of the round-18 sweep)."""
    from bitcompile.kernels.common import ONE_TABLES
    (m, n), k = g.shape, out.shape[1]
    lo, hi = ONE_TABLES["bf16" if g.dtype == torch.bfloat16 else "fp16"]
    g_desc, p_desc = descriptors(g, wq, BM, BK)
    grid = (-(-m // BM) * -(-k // BK),)
    return _grad_input_ws_kernel[grid](g_desc, p_desc, ws, out, m, k, -(-n // CH.value), 0, out.stride(0),
                                       LO=int32(lo), HI=int32(hi), GROUP_K=GROUP_K, STAGES=STAGES, SB=SB, DW=DW,
                                       DREGS=DREGS, num_warps=num_warps, maxnreg=maxnreg)


WS_CONFIGS = [dict(BM=256, BK=128, STAGES=4, SB=3, DW=4, DREGS=88), dict(BM=256, BK=128, STAGES=3, SB=3, DW=4, DREGS=88),
              dict(BM=256, BK=128, STAGES=4, SB=4, DW=4, DREGS=88), dict(BM=256, BK=128, STAGES=5, SB=3, DW=4, DREGS=88),
              dict(BM=256, BK=128, STAGES=4, SB=3, DW=4, DREGS=112), dict(BM=256, BK=128, STAGES=4, SB=3, DW=4, DREGS=64),
              dict(BM=256, BK=64, STAGES=4, SB=3, DW=4, DREGS=88), dict(BM=256, BK=128, STAGES=4, SB=3, DW=4, DREGS=88,
                                                                         GROUP_K=16)]


def static():
    """Compile every WS_CONFIGS entry for sm_90 and print its SASS profile (``kernels.codegen``)."""
    import triton
    from bitcompile.kernels import codegen
    from triton.runtime.jit import mangle_type
    m, n, k = 8192, 4096, 4096
    compile0 = triton.compile
    for cfg in WS_CONFIGS:
        cfg = dict(cfg)
        maxnreg = cfg.pop("maxnreg", 168)
        # codegen.compile_sm90 passes no register limit: add the launch's maxnreg for this call
        triton.compile = lambda src, target=None, options=None: compile0(src, target=target,
                                                                         options=dict(options, maxnreg=maxnreg))
        g = torch.empty(m, n, dtype=torch.bfloat16)
        wq = torch.empty(n, k // 4, dtype=torch.uint8)
        g_desc, p_desc = descriptors(g, wq, cfg["BM"], cfg["BK"])
        args = dict(g_desc=mangle_type(g_desc), p_desc=mangle_type(p_desc), WS="*fp32", OUT="*bf16", M=m, K=k,
                    STEPS=n // CH.value, ZERO=0, stride_o=k)
        ce = dict(LO=int32(0x80800080), HI=int32(0x3F3F00BF), GROUP_K=cfg.get("GROUP_K", 8), STAGES=cfg["STAGES"],
                  SB=cfg["SB"], DW=cfg["DW"], DREGS=cfg["DREGS"], num_warps=8)
        try:
            print(cfg, codegen.profile(_grad_input_ws_kernel, args, ce, 8, 1), flush=True)
        except Exception:
            import traceback
            traceback.print_exc()
            break
    triton.compile = compile0


def gpu():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_kernels import time_rotating, copies
    from bitcompile.kernels import grad_input as gi
    from bitcompile.quant.packing import pack_ternary
    torch.manual_seed(0)
    for m, n, k in [(300, 512, 320), (8192, 4096, 4096), (8192, 8192, 8192), (8192, 4096, 14336), (8192, 14336, 4096)]:
        for dtype in (torch.bfloat16, torch.float16) if (m, n) == (8192, 4096) and k == 4096 else (torch.bfloat16,):
            g = torch.randn(m, n, device="cuda", dtype=dtype)
            nw = copies(n * k // 4)
            trits = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8)
            packed = [pack_ternary(trits)] + [pack_ternary(torch.randint(-1, 2, (n, k), device="cuda",
                                                                         dtype=torch.int8)) for _ in range(nw - 1)]
            ws = torch.tensor([0.0173], device="cuda")
            ref = (g.double() @ (trits.double() * ws.to(dtype).double())).float()
            shipped = gi.grad_input(g, packed[0], ws, k)
            print(f"\n{m}x{n}x{k} {dtype}: shipped max err {(shipped.float() - ref).abs().max().item():.3e} "
                  f"(|ref| max {ref.abs().max().item():.2f})", flush=True)
            outs = [torch.empty(m, k, device="cuda", dtype=dtype) for _ in range(nw)]
            ops = 2 * m * n * k
            if m == 8192:
                wb = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies(n * k * 2))]
                cub = time_rotating([lambda w=w: g @ w for w in wb], graph=True, reps=20)
                del wb
                shp = time_rotating([lambda p=p: gi.grad_input(g, p, ws, k) for p in packed], graph=True, reps=20)
                print(f"  cuBLAS {cub:.1f} us ({ops / cub / 1e6:.0f} TFLOPS); shipped {shp:.1f} us "
                      f"({cub / shp:.3f}x cuBLAS)", flush=True)
            variants = [(launch_ws, c) for c in WS_CONFIGS]
            for fn, cfg in variants:
                try:
                    fn(g, packed[0], ws, outs[0], **cfg)
                    torch.cuda.synchronize()
                    err = (outs[0].float() - ref).abs().max().item()
                    same = torch.equal(outs[0], shipped)
                    msg = f"  {fn.__name__} {cfg}: max err {err:.3e} equal-to-shipped {same}"
                    if m == 8192:
                        t = time_rotating([lambda p=p, o=o: fn(g, p, ws, o, **cfg) for p, o in zip(packed, outs)],
                                          graph=True, reps=20)
                        msg += f"  {t:.1f} us ({ops / t / 1e6:.0f} TFLOPS, {cub / t:.3f}x cuBLAS, {shp / t:.2f}x shipped)"
                    print(msg, flush=True)
                except Exception as err:
                    print(f"  {cfg}: FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)


if __name__ == "__main__":
    static() if sys.argv[1:] == ["static"] else gpu()
