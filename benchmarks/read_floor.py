"""How fast can any kernel read a buffer the size of the packed weights, timed exactly as the
matmul rows are (``bench_kernels.time_rotating``: CUDA-graph replay, copies rotated past the L2)?

A read-only Triton kernel (16-byte loads, one xor-reduced word stored per program) over every
tile shape below; the best is the floor a GEMV on that many packed bytes could reach in this
harness, launch and ramp included. The 1 GiB copy bandwidth the targets quote hides both.

    python3 benchmarks/read_floor.py [MB ...]     # default: the packed sizes of the M=1 rows
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

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


def floor_us(nbytes: int) -> tuple[float, tuple]:
    words = nbytes // 4
    bufs = [torch.randint(-2**31, 2**31 - 1, (words,), device=DEVICE, dtype=torch.int32)
            for _ in range(copies(nbytes))]
    best = (float("inf"), None)
    for chunk, block, warps in TILES:
        grid = (triton.cdiv(words, chunk),)
        out = torch.empty(grid[0], device=DEVICE, dtype=torch.int32)
        fns = [lambda b=b: _read_kernel[grid](b, out, words, CHUNK=chunk, BLOCK=block, num_warps=warps)
               for b in bufs]
        us = time_rotating(fns, graph=DEVICE == "cuda", reps=20)
        best = min(best, (us, (chunk, block, warps)))
    return best


def main() -> int:
    if DEVICE != "cuda":
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    sizes = [float(v) for v in sys.argv[1:]] or [8192 * 8192 / 4 / 2**20, 4096 * 4096 / 4 / 2**20,
                                                 14336 * 4096 / 4 / 2**20]
    bandwidth = copy_bandwidth(2**30)
    print(f"copy bandwidth (1 GiB) {bandwidth:.2f} TB/s; {torch.cuda.get_device_name()}, triton {triton.__version__}")
    one = torch.zeros(1, device=DEVICE)
    print(f"a 1-element kernel: {time_rotating([one.zero_] * 8, graph=True, reps=20):.2f} us")
    for mb in sizes:
        nbytes = int(mb * 2**20)
        us, tile = floor_us(nbytes)
        print(f"read {mb:6.2f} MiB: {us:6.2f} us = {nbytes / us / 1e6:5.2f} TB/s "
              f"({100 * nbytes / us / 1e6 / bandwidth:3.0f}% of copy)  best (chunk, block, warps) {tile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
