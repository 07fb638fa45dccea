"""Where a QAT step's time goes: one layer's forward + backward through the bitnet ops at
8192 tokens, bf16, per CUDA kernel (torch.profiler), next to Inductor's fake-quant layer.

    python benchmarks/profile_qat.py [N K]
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import qat_steps  # noqa: E402


def kernel_table(fn, label: str, steps: int = 5) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    print(f"\n== {label}: per step, {steps} steps averaged")
    rows = [(e.key, e.device_time_total / steps, e.count // steps) for e in prof.key_averages() if e.device_time_total > 0]
    for name, us, count in sorted(rows, key=lambda r: -r[1])[:12]:
        print(f"{us:9.1f} us  x{count}  {name[:110]}")
    print(f"{sum(r[1] for r in rows):9.1f} us  total")


def main():
    n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 8192)
    m = 8192
    labels = {"ours": "bitnet ops", "compiled": "nn.Linear, backend=bitnet", "inductor": "Inductor fake-quant"}
    steps = qat_steps(m, n, k)
    for name, label in labels.items():
        step = steps[name]
        kernel_table(step, f"{label}, M={m}, N={n}, K={k}")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        # Against the kernel total above: a wall time well above it means the host is the limit.
        print(f"{(time.perf_counter() - start) / 5 * 1e6:9.1f} us  wall time per step")


if __name__ == "__main__":
    main()
