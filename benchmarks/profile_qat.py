"""Where a QAT step's time goes: one layer's forward + backward through the bitnet ops at
8192 tokens, bf16, per CUDA kernel (torch.profiler), next to Inductor's fake-quant layer.

    python benchmarks/profile_qat.py [N K] [--host] [--smoke]

``--host``: also where the host's time per step goes (operators and CUDA runtime calls), for
shapes where the wall time is well above the kernel total.

``--smoke``: 32 tokens, 64x64, on the CPU if there is no GPU (profiles CPU ops): checks the
script runs.
"""

import argparse

from profiling import host_table, kernel_table
from qat_steps import qat_steps
from timing import parse_args, wall_us


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
        print("\n" + kernel_table(step, f"{label}, M={m}, N={n}, K={k}"))
        # Against the kernel total above: a wall time well above it means the host is the limit.
        print(f"{wall_us(step, 5):9.1f} us  wall time per step")
        if args.host:
            print(host_table(step))


if __name__ == "__main__":
    main()
