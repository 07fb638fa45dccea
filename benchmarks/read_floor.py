"""How fast can any kernel read a buffer the size of the packed weights, timed exactly as the
matmul rows are (``timing.time_rotating``: CUDA-graph replay, copies rotated past the L2)?

The read-only kernel of ``timing.read_floor_us`` over every tile shape below; the best is the floor a GEMV
on that many packed bytes could reach in this harness, launch and ramp included. The 1 GiB copy bandwidth
the targets quote hides both.

    python3 benchmarks/read_floor.py [MiB ...]    # default: the packed sizes of the M=1 rows
    python3 benchmarks/read_floor.py --smoke      # tiny sizes, any device: the script runs
"""

from __future__ import annotations

import argparse

import torch
import triton

from timing import CUDA, DEVICE, copy_bandwidth, device_name, parse_args, read_floor_us, tb_per_s, time_rotating

TILES = [
    (chunk, block, warps)
    for chunk in (1024, 2048, 4096, 8192)
    for block in (256, 512, 1024)
    for warps in (1, 2, 4)
    if block <= chunk and block >= 128 * warps
]
DEFAULT_MIB = [8192 * 8192 / 4 / 2**20, 4096 * 4096 / 4 / 2**20, 14336 * 4096 / 4 / 2**20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mib", nargs="*", type=float, help="buffer sizes in MiB")
    args = parse_args(parser)
    sizes = args.mib or ([0.01] if args.smoke else DEFAULT_MIB)
    bandwidth = copy_bandwidth(2**20 if args.smoke else 2**30)
    print(f"copy bandwidth {bandwidth:.2f} TB/s; {device_name()}, triton {triton.__version__}")
    one = torch.zeros(1, device=DEVICE)
    print(f"a 1-element kernel: {time_rotating([one.zero_] * 8, graph=CUDA, reps=20):.2f} us")
    for mib in sizes:
        nbytes = int(mib * 2**20)
        us, tile = read_floor_us(nbytes, [(1024, 256, 1)] if args.smoke else TILES)
        tbs = tb_per_s(nbytes, us)
        print(
            f"read {mib:6.2f} MiB: {us:6.2f} us = {tbs:5.2f} TB/s ({100 * tbs / bandwidth:3.0f}% of copy)  "
            f"best (chunk, block, warps) {tile}"
        )


if __name__ == "__main__":
    main()
