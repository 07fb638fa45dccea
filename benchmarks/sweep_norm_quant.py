"""Activation-quantization kernel (``bitcompile/kernels/act_quant.py``) across warps per row, against the
bytes it must move (read x, write int8 q): is it at the copy bandwidth, and does the launcher's
warp count (``act_quant.num_warps``) pick the best one? Timed by the tuner's timer (``timing.cold_l2_us``).

    python3 benchmarks/sweep_norm_quant.py [M K ...]   # default: 8192 8192 and 8192 4096
    python3 benchmarks/sweep_norm_quant.py --smoke     # tiny shapes, any device: the script runs
"""

import argparse

import torch

from bitcompile.kernels import act_quant

from timing import CUDA, DEVICE, cold_l2_us, parse_args, tb_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dims", nargs="*", type=int, help="M K pairs")
    args = parse_args(parser)
    dims = [8, 64] if args.smoke else args.dims or [8192, 8192, 8192, 4096]
    src = torch.empty(1 << (10 if args.smoke else 30), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_tbs = tb_per_s(2 * src.numel(), cold_l2_us(lambda: dst.copy_(src)))
    print(f"copy bandwidth {copy_tbs:.2f} TB/s")
    for m, k in zip(dims[::2], dims[1::2]):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32)
        q = torch.empty(m, k, device=DEVICE, dtype=torch.int8)
        s = torch.empty(m, 1, device=DEVICE, dtype=torch.float32)
        block = max(16, 1 << (k - 1).bit_length())
        for kind in ("none", "rms"):
            flags = dict(
                BLOCK=block,
                NORM=act_quant.NORM_KINDS[kind],
                HAS_RES=False,
                HAS_W=False,
                HAS_B=False,
                STORE_Y=False,
                STORE_H=False,
                USE_ASM=CUDA,
            )
            for warps in sorted({2, 4, 8, 16, 32, act_quant.num_warps(block)}):

                def run():
                    act_quant._norm_quant_kernel[(m,)](
                        x, x, x, x, q, s, x, x, k, k, k, k, k, k, 1e-6, 127.0, act_quant.EPS, num_warps=warps, **flags
                    )

                us = cold_l2_us(run)
                tbs = tb_per_s(m * k * 3, us)
                default = " (launcher's)" if warps == act_quant.num_warps(block) else ""
                print(
                    f"{m}x{k} {kind:4s} warps={warps:2d}: {us:7.1f} us, {tbs:.2f} TB/s "
                    f"({100 * tbs / copy_tbs:.0f}% of copy){default}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
