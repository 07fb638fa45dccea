"""Activation-quantization kernel (``bitcompile/kernels/act_quant.py``) across warps per row, against the
bytes it must move (read x, write int8 q): is it at the copy bandwidth, and does the launcher's
warp count (``act_quant.num_warps``) pick the best one?

    python3 benchmarks/sweep_norm_quant.py [M K ...]   # default: 8192 8192 and 8192 4096
    python3 benchmarks/sweep_norm_quant.py --smoke     # tiny shapes, any device: the script runs
"""
import sys
import time

import torch

from bitcompile.kernels import act_quant, tuning


def microseconds(fn) -> float:
    if torch.cuda.is_available():  # the tuner's timer: cold L2, host launch time excluded
        return tuning.gpu_microseconds(fn)
    start = time.perf_counter()  # smoke runs (the interpreter): wall clock of one call
    fn()
    return (time.perf_counter() - start) * 1e6


def main() -> int:
    smoke = "--smoke" in sys.argv
    if not torch.cuda.is_available() and not smoke:
        print("needs a CUDA GPU (--smoke runs tiny shapes anywhere)", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = [8, 64] if smoke else [int(v) for v in sys.argv[1:]] or [8192, 8192, 8192, 4096]
    src = torch.empty(1 << (10 if smoke else 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / (microseconds(lambda: dst.copy_(src)) * 1e-6) / 1e12
    print(f"copy bandwidth {copy_tbs:.2f} TB/s")
    for m, k in zip(dims[::2], dims[1::2]):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        q = torch.empty(m, k, device=device, dtype=torch.int8)
        s = torch.empty(m, 1, device=device, dtype=torch.float32)
        block = max(16, 1 << (k - 1).bit_length())
        for kind in ("none", "rms"):
            flags = dict(BLOCK=block, NORM=act_quant.NORM_KINDS[kind], HAS_RES=False, HAS_W=False, HAS_B=False,
                         STORE_Y=False, STORE_H=False, USE_ASM=device == "cuda")
            for warps in sorted({2, 4, 8, 16, 32, act_quant.num_warps(block)}):
                def run():
                    act_quant._norm_quant_kernel[(m,)](x, x, x, x, q, s, x, x, k, k, k, k, k, k, 1e-6, 127.0,
                                                       act_quant.EPS, num_warps=warps, **flags)
                us = microseconds(run)
                tbs = m * k * 3 / (us * 1e-6) / 1e12
                default = " (launcher's)" if warps == act_quant.num_warps(block) else ""
                print(f"{m}x{k} {kind:4s} warps={warps:2d}: {us:7.1f} us, {tbs:.2f} TB/s "
                      f"({100 * tbs / copy_tbs:.0f}% of copy){default}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
