"""Round 19: the shipped Gluon input gradient (column-order decode) vs round 18's experiment,
the shipped transposed Triton kernel and cuBLAS. Exactness and timing."""
import sys
import torch
sys.path.insert(0, "benchmarks")
from bench_kernels import time_rotating, copies  # noqa: E402
from bitcompile.kernels import grad_input as gi, grad_input_ws as ws  # noqa: E402
from bitcompile.quant.packing import pack_ternary  # noqa: E402
import experiment_grad_input_ws as old  # noqa: E402

T = dict(layout="transposed", BK=128, BM=64, JOIN=False, GROUP_K=8, num_warps=4, num_stages=3)
torch.manual_seed(0)
SHAPES = [((333, 2000, 1021), (torch.bfloat16, torch.float16)), ((1024, 2048, 4096), (torch.bfloat16, torch.float16)),
          ((8192, 4096, 4096), (torch.bfloat16, torch.float16)), ((8192, 8192, 8192), (torch.bfloat16,)),
          ((8192, 4096, 14336), (torch.bfloat16,)), ((8192, 14336, 4096), (torch.bfloat16,))]
for (m, n, k), dtypes in SHAPES:
    for dtype in dtypes:
        g = torch.randn(m, n, device="cuda", dtype=dtype)
        nw = copies(n * k // 4)
        trits = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8)
        packed = [pack_ternary(trits)] + [pack_ternary(torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8))
                                          for _ in range(nw - 1)]
        wsc = torch.tensor([0.0173], device="cuda")
        ref = (g.double() @ (trits.double() * wsc.to(dtype).double())).float()
        shipped = gi.grad_input(g, packed[0], wsc, k, config=T)
        print(f"\n{m}x{n}x{k} {dtype}: transposed max err {(shipped.float() - ref).abs().max().item():.3e} "
              f"(|ref| max {ref.abs().max().item():.2f}); supports {ws.supports(g, packed[0], wsc)}", flush=True)
        big = m >= 1024
        ops = 2 * m * n * k
        if big:
            wb = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies(n * k * 2))]
            cub = time_rotating([lambda w=w: g @ w for w in wb], graph=True, reps=20)
            del wb
            shp = time_rotating([lambda p=p: gi.grad_input(g, p, wsc, k, config=T) for p in packed], graph=True, reps=20)
            print(f"  cuBLAS {cub:.1f} us ({ops / cub / 1e6:.0f} TFLOPS); transposed {shp:.1f} us ({cub / shp:.3f}x)",
                  flush=True)
        variants = [("ws " + str(c), lambda p, c=c: gi.grad_input(g, p, wsc, k, config=dict(layout="ws", **c)))
                    for c in ws.CONFIGS]
        if k % 64 == 0:
            outs = [torch.empty(m, k, device="cuda", dtype=dtype) for _ in range(nw)]
            variants.append(("round-18 experiment", lambda p, o=outs: (old.launch_ws(g, p, wsc, o[0]), o[0])[1]))
        for name, fn in variants:
            try:
                out = fn(packed[0])
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                msg = f"  {name}: max err {err:.3e} equal-to-transposed {torch.equal(out, shipped)}"
                if big:
                    t = time_rotating([lambda p=p: fn(p) for p in packed], graph=True, reps=20)
                    msg += f"  {t:.1f} us ({ops / t / 1e6:.0f} TFLOPS, {cub / t:.3f}x cuBLAS, {shp / t:.2f}x transposed)"
                print(msg, flush=True)
            except Exception as err:
                print(f"  {name}: FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
