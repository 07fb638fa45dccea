"""Activation-quantization kernel (``bitcompile/kernels/act_quant.py``) across warps per row, against the
bytes it must move (read x, write int8 q): is it at the copy bandwidth, and does the launcher's
warp count (``act_quant.num_warps``) pick the best one? Timed by the tuner's timer (``timing.cold_l2_us``).

    python3 benchmarks/sweep_norm_quant.py [M K ...]   # default: 8192 8192 and 8192 4096
    python3 benchmarks/sweep_norm_quant.py --gated     # SwiGLU + quantization (rows of 2 x 14336 at
                                                       # 1, 8, 2048 rows): fused, against silu·mul
                                                       # under Inductor, then the plain quantizer
    python3 benchmarks/sweep_norm_quant.py --smoke     # tiny shapes, any device: the script runs
"""

import argparse

import torch
import torch.nn.functional as F

from bitcompile.kernels import act_quant

from timing import CUDA, DEVICE, cold_l2_us, parse_args, tb_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dims", nargs="*", type=int, help="M K pairs")
    parser.add_argument("--gated", action="store_true", help="the SwiGLU prologue (K: the product's width)")
    args = parse_args(parser)
    if args.gated:
        return gated(args)
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


def gated(args) -> None:
    """The fused SwiGLU + quantization at each warp count, against the two kernels it replaces."""
    dims = [2, 32] if args.smoke else args.dims or [1, 14336, 8, 14336, 2048, 14336]
    dtype = torch.bfloat16 if CUDA else torch.float32
    for m, k in zip(dims[::2], dims[1::2]):
        y = 3 * torch.randn(m, 2 * k, device=DEVICE, dtype=dtype)
        product = torch.compile(lambda y: F.silu(y[:, :k]) * y[:, k:])
        prod = product(y)
        times = {
            "silu*mul (Inductor)": cold_l2_us(lambda: product(y)),
            "quantize the product": cold_l2_us(lambda: act_quant.norm_quant(prod, 8)),
        }
        times["the two"] = cold_l2_us(lambda: act_quant.norm_quant(product(y), 8))
        q = torch.empty(m, k, device=DEVICE, dtype=torch.int8)
        s = torch.empty(m, 1, device=DEVICE, dtype=torch.float32)
        block = max(16, 1 << (k - 1).bit_length())
        flags = dict(BLOCK=block, NORM=0, HAS_RES=False, HAS_W=False, HAS_B=False, STORE_Y=False, STORE_H=False)
        for warps in sorted({4, 8, 16, 32, act_quant.gated_num_warps(block)}):

            def run():
                act_quant._norm_quant_kernel[(m,)](
                    y,
                    y,
                    y,
                    y,
                    q,
                    s,
                    y,
                    y,
                    k,
                    2 * k,
                    2 * k,
                    k,
                    k,
                    k,
                    1e-6,
                    127.0,
                    act_quant.EPS,
                    USE_ASM=CUDA,
                    GATED=True,
                    num_warps=warps,
                    **flags,
                )

            launcher = " (launcher's)" if warps == act_quant.gated_num_warps(block) else ""
            times[f"fused, warps={warps}{launcher}"] = cold_l2_us(run)
        for name, us in times.items():
            print(f"{m}x2x{k} {name:28s} {us:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
