"""How fast can any kernel read a buffer the size of the packed weights, timed exactly as the
matmul rows are (``bench_kernels.time_rotating``: CUDA-graph replay, copies rotated past the L2)?

A read-only Triton kernel (16-byte loads, one xor-reduced word stored per program) over every
tile shape below; the best is the floor a GEMV on that many packed bytes could reach in this
harness, launch and ramp included. The 1 GiB copy bandwidth the targets quote hides both.

    python3 benchmarks/read_floor.py [MiB ...]    # default: the packed sizes of the M=1 rows
    python3 benchmarks/read_floor.py --smoke      # tiny sizes, any device: the script runs
"""
from __future__ import annotations

import functools
import operator
import sys

import torch
import triton
import triton.language as tl

import bench_kernels
from bench_kernels import DEVICE, copies, copy_bandwidth, time_rotating


@triton.jit
def _read_kernel(X, OUT, WORDS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for w in range(0, CHUNK, BLOCK):
        offs = base + w + tl.arange(0, BLOCK)
        acc ^= tl.load(X + offs, mask=offs < WORDS, other=0)
    tl.store(OUT + tl.program_id(0), tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


TILES = [(chunk, block, warps) for chunk in (1024, 2048, 4096, 8192) for block in (256, 512, 1024)
         for warps in (1, 2, 4) if block <= chunk and block >= 128 * warps]


def floor_us(nbytes: int, tiles) -> tuple[float, tuple]:
    """Fastest read of ``nbytes`` over ``tiles``; every tile's result is checked (the stored
    xor of each chunk), so no timed kernel can have skipped its loads."""
    words = nbytes // 4
    bufs = [torch.randint(-2**31, 2**31 - 1, (words,), device=DEVICE, dtype=torch.int32)
            for _ in range(copies(nbytes))]
    best = (float("inf"), None)
    for chunk, block, warps in tiles:
        grid = (triton.cdiv(words, chunk),)
        out = torch.empty(grid[0], device=DEVICE, dtype=torch.int32)
        fns = [lambda b=b: _read_kernel[grid](b, out, words, CHUNK=chunk, BLOCK=block, num_warps=warps)
               for b in bufs]
        us = time_rotating(fns, graph=DEVICE == "cuda", reps=20)
        fns[0]()
        chunks = bufs[0].cpu().split(chunk)
        want = [functools.reduce(operator.xor, c.tolist()) for c in chunks[:3]] + \
            [functools.reduce(operator.xor, chunks[-1].tolist())]
        got = out.cpu().tolist()
        if got[:3] + got[-1:] != want:
            raise RuntimeError(f"read kernel wrong for tile {(chunk, block, warps)}")
        best = min(best, (us, (chunk, block, warps)))
    return best


def main() -> int:
    smoke = "--smoke" in sys.argv
    if DEVICE != "cuda" and not smoke:
        print("needs a CUDA GPU (--smoke runs tiny sizes anywhere)", file=sys.stderr)
        return 1
    if smoke:
        bench_kernels.ROTATE_BYTES = 0  # two copies
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    sizes = [float(v) for v in args] or ([0.01] if smoke else [8192 * 8192 / 4 / 2**20, 4096 * 4096 / 4 / 2**20,
                                                                 14336 * 4096 / 4 / 2**20])
    bandwidth = copy_bandwidth(2**20 if smoke else 2**30)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"copy bandwidth {bandwidth:.2f} TB/s; {device}, triton {triton.__version__}")
    one = torch.zeros(1, device=DEVICE)
    print(f"a 1-element kernel: {time_rotating([one.zero_] * 8, graph=DEVICE == 'cuda', reps=20):.2f} us")
    for mib in sizes:
        nbytes = int(mib * 2**20)
        us, tile = floor_us(nbytes, [(1024, 256, 1)] if smoke else TILES)
        print(f"read {mib:6.2f} MiB: {us:6.2f} us = {nbytes / us / 1e6:5.2f} TB/s "
              f"({100 * nbytes / us / 1e6 / bandwidth:3.0f}% of copy)  best (chunk, block, warps) {tile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
