"""Where a QAT step's time goes: one layer's forward + backward through the bitnet ops at
8192 tokens, bf16, per CUDA kernel (torch.profiler), next to Inductor's fake-quant layer.

    python benchmarks/profile_qat.py [N K] [--host] [--smoke]

``--host``: also where the host's time per step goes (operators and CUDA runtime calls), for
shapes where the wall time is well above the kernel total.

``--smoke``: 32 tokens, 64x64, on the CPU if there is no GPU (profiles CPU ops): checks the
script runs.
"""

import argparse

from torch.profiler import ProfilerActivity, profile

from qat_steps import qat_steps
from timing import CUDA, parse_args, sync, wall_us


def kernel_table(fn, label: str, steps: int = 5) -> None:
    for _ in range(3):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        sync()
    print(f"\n== {label}: per step, {steps} steps averaged")
    rows = [
        (e.key, (e.device_time_total if CUDA else e.self_cpu_time_total) / steps, e.count // steps)
        for e in prof.key_averages()
    ]
    rows = [r for r in rows if r[1] > 0]
    for name, us, count in sorted(rows, key=lambda r: -r[1])[:12]:
        print(f"{us:9.1f} us  x{count}  {name[:110]}")
    print(f"{sum(r[1] for r in rows):9.1f} us  total")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", nargs="*", type=int, help="N K (default 8192 8192)")
    ap.add_argument("--host", action="store_true", help="also profile the host side of each step")
    args = parse_args(ap)
    m, (n, k) = (32, (64, 64)) if args.smoke else (8192, args.shape or (8192, 8192))
    labels = {
        "ours": "bitnet ops",
        "compiled": "nn.Linear, backend=bitnet",
        "compiled_q8": "nn.Linear, backend=bitnet, grad_input_bits=8",
        "inductor": "Inductor fake-quant",
    }
    steps = qat_steps(m, n, k)
    for name, label in labels.items():
        step = steps[name]
        kernel_table(step, f"{label}, M={m}, N={n}, K={k}")
        # Against the kernel total above: a wall time well above it means the host is the limit.
        print(f"{wall_us(step, 5):9.1f} us  wall time per step")
        if args.host:
            host_table(step)


def host_table(step, steps: int = 20) -> None:
    """Host time per step by operator and CUDA runtime call (torch.profiler's CPU side: unlike
    cProfile it sees time spent in C++ and in the CUDA driver, e.g. a blocking call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
    print(f"host time per step by own CPU time ({steps} steps averaged):")
    for e in rows:
        print(f"{e.self_cpu_time_total / steps:9.1f} us  x{e.count // steps}  {e.key[:100]}")


if __name__ == "__main__":
    main()
