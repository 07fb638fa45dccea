"""Activation-quantization kernel (``kernels/act_quant.py``) across warps per row, against the
bytes it must move (read x, write int8 q): is it at the copy bandwidth, and does the launcher's
warp count (``act_quant.num_warps``) pick the best one? CUDA only.

    python3 benchmarks/sweep_norm_quant.py [M K ...]   # default: 8192 8192 and 8192 4096
"""
import sys

import torch
from triton.testing import do_bench

from bitcompile.kernels import act_quant


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    dims = [int(v) for v in sys.argv[1:]] or [8192, 8192, 8192, 4096]
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e12
    print(f"copy bandwidth {copy_tbs:.2f} TB/s")
    for m, k in zip(dims[::2], dims[1::2]):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(m, k, device="cuda", dtype=torch.int8)
        s = torch.empty(m, 1, device="cuda", dtype=torch.float32)
        block = max(16, 1 << (k - 1).bit_length())
        for kind in ("none", "rms"):
            flags = dict(BLOCK=block, NORM=act_quant.NORM_KINDS[kind], HAS_RES=False, HAS_W=False, HAS_B=False,
                         STORE_Y=False, STORE_H=False)
            for warps in (2, 4, 8, 16, 32):
                def run():
                    act_quant._norm_quant_kernel[(m,)](x, x, x, x, q, s, x, x, k, k, k, k, k, k, 1e-6, 127.0,
                                                       act_quant.EPS, num_warps=warps, **flags)
                us = do_bench(run) * 1e3
                tbs = m * k * 3 / (us * 1e-6) / 1e12
                default = " (launcher's)" if warps == act_quant.num_warps(block) else ""
                print(f"{m}x{k} {kind:4s} warps={warps:2d}: {us:7.1f} us, {tbs:.2f} TB/s "
                      f"({100 * tbs / copy_tbs:.0f}% of copy){default}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
