"""Which side limits the Gluon input gradient: timing-only variants without the decode's work
(NODEC: the decode warps wait and signal, no load/decode/store) or without the MMAs (NOMMA)."""
import importlib.util, pathlib, sys
import torch
sys.path.insert(0, "benchmarks")
from bench_kernels import time_rotating, copies  # noqa: E402
from bitcompile.kernels import grad_input_ws as ws  # noqa: E402

src = pathlib.Path("kernels/grad_input_ws.py").read_text()
DEC = "            b_smem.index(i % SB).store(_decode(p_smem.index(s).load(layout), lo, hi, dtype))\n"
MMA = "            acc = warpgroup_mma(g_smem.index(s), b_smem.index(i % SB), acc, is_async=True)\n"
assert DEC in src and MMA in src
mods = {}
for name, text in {"NODEC": src.replace(DEC, ""), "NOMMA": src.replace(MMA, ""),
                   "NOBOTH": src.replace(DEC, "").replace(MMA, "")}.items():
    path = pathlib.Path(f"benchmarks/tmp/ws_{name}.py")
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"ws_{name}", path)
    mods[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mods[name])
mods["shipped"] = ws
cfg = ws.CONFIGS[0]
for m, n, k in [(8192, 4096, 4096), (8192, 8192, 8192)]:
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    nw = copies(n * k // 4)
    packed = [torch.randint(0, 255, (n, k // 4), device="cuda", dtype=torch.uint8) for _ in range(nw)]
    s = torch.tensor([0.01], device="cuda")
    out = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(n * k * 2))]
    cub = time_rotating([lambda w=w: g @ w for w in wb], graph=True, reps=20)
    del wb
    print(f"{m}x{n}x{k}: cuBLAS {cub:.1f} us", flush=True)
    for name, mod in mods.items():
        try:
            t = time_rotating([lambda p=p: mod.launch(g, p, s, out, **cfg) for p in packed], graph=True, reps=20)
            print(f"  {name}: {t:.1f} us ({cub / t:.3f}x cuBLAS)", flush=True)
        except Exception as e:
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
