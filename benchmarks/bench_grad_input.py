"""The exact-STE input gradient ``g [M, N] @ (trits * s_w)`` at QAT shapes: every kernel family
(the canonical and transposed Triton kernels, the warp-specialised Gluon one) against bf16 cuBLAS
on the same GEMM, timed as ``bench_kernels.py`` times (CUDA-graph replay, packed weights rotated
past the L2), each output checked bit for bit against the transposed kernel's.

``--limits`` also times two variants of the Gluon kernel that only keep their timing meaning:
without the decode warps' work (they wait and signal; the MMAs read whatever the trits buffer
holds) and without the MMAs. Which side bounds the kernel (BENCHMARKS.md round 19).

    python3 benchmarks/bench_grad_input.py [--limits]
    python3 benchmarks/bench_grad_input.py --smoke   # tiny shapes, any device: the script runs
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

import bench_kernels
from bench_kernels import DEVICE, copies, time_rotating
from bitcompile.kernels import grad_input as gi
from bitcompile.kernels import grad_input_ws
from bitcompile.quant.packing import pack_ternary

SHAPES = [(8192, 4096, 4096, torch.bfloat16), (8192, 4096, 4096, torch.float16), (8192, 8192, 8192, torch.bfloat16),
          (8192, 4096, 14336, torch.bfloat16), (8192, 14336, 4096, torch.bfloat16)]
SMOKE = [(20, 64, 64, torch.float16)]


def gluon_variant(name: str, drop: str):
    """``kernels/grad_input_ws.py`` with the source line ``drop`` removed, imported as a module."""
    src = Path(grad_input_ws.__file__).read_text()
    assert drop in src, f"{name}: the kernel no longer has the line this variant drops"
    path = Path(tempfile.mkdtemp()) / f"grad_input_ws_{name}.py"
    path.write_text(src.replace(drop, ""))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LIMITS = {"no decode": "            b_smem.index(i % SB).store(_decode(p_smem.index(s).load(layout), lo, hi, dtype))\n",
          "no MMA": "            acc = warpgroup_mma(g_smem.index(s), b_smem.index(i % SB), acc, is_async=True)\n"}


def bench(m: int, n: int, k: int, dtype: torch.dtype, limits: bool) -> None:
    g = torch.randn(m, n, device=DEVICE, dtype=dtype)
    packed = [pack_ternary(torch.randint(-1, 2, (n, k), device=DEVICE, dtype=torch.int8))
              for _ in range(copies(n * k // 4))]
    ws = torch.tensor([0.0173], device=DEVICE)
    weights = [torch.randn(n, k, device=DEVICE, dtype=dtype) for _ in range(copies(n * k * 2))]
    cublas = time_rotating([lambda w=w: g @ w for w in weights], graph=DEVICE == "cuda", reps=20)
    del weights
    print(f"\n{m}x{n}x{k} {dtype}: cuBLAS {cublas:.1f} us ({2 * m * n * k / cublas / 1e6:.0f} TFLOPS)", flush=True)
    configs = gi._configs(transposed_ok=True, ws_ok=grad_input_ws.supports(g, packed[0], ws))
    families = {}  # the first configuration of each kernel family, the Gluon tiles each
    for cfg in configs:
        layout = cfg.get("layout", "canonical")
        families.setdefault(layout if layout != "ws" else str(cfg), cfg)
    reference = gi.grad_input(g, packed[0], ws, k, config=families["transposed"])
    for name, cfg in families.items():
        got = gi.grad_input(g, packed[0], ws, k, config=cfg)
        t = time_rotating([lambda p=p: gi.grad_input(g, p, ws, k, config=cfg) for p in packed], graph=DEVICE == "cuda",
                          reps=20)
        print(f"  {name}: {t:.1f} us ({cublas / t:.3f}x cuBLAS), equal to transposed: {torch.equal(got, reference)}",
              flush=True)
    if limits and grad_input_ws.supports(g, packed[0], ws):
        out = torch.empty(m, k, device=DEVICE, dtype=dtype)
        tile = grad_input_ws.CONFIGS[0]
        for name, drop in LIMITS.items():
            variant = gluon_variant(name.replace(" ", "_"), drop)
            t = time_rotating([lambda p=p: variant.launch(g, p, ws, out, **tile) for p in packed], graph=True, reps=20)
            print(f"  Gluon kernel, {name} (timing only): {t:.1f} us ({cublas / t:.3f}x cuBLAS)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", action="store_true", help="also the timing-only variants of the Gluon kernel")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    args = parser.parse_args()
    if args.smoke:
        bench_kernels.ROTATE_BYTES = 0  # two copies of each operand
    elif DEVICE != "cuda":
        parser.error("the benchmark needs a CUDA GPU (--smoke runs it at tiny shapes on the CPU)")
    torch.manual_seed(0)
    for m, n, k, dtype in SMOKE if args.smoke else SHAPES:
        bench(m, n, k, dtype, args.limits)


if __name__ == "__main__":
    main()
