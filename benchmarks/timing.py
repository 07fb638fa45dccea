"""How the benchmark scripts time: the one module they share (each runs as ``python benchmarks/X.py``, so
``import timing`` finds this file next to it).

On CUDA a time is the median, in microseconds, of repeated CUDA-event intervals:

- ``time_rotating``: one call, cycling over copies of its operands (``copies``: together several times the
  L2, so every call reads from HBM), replayed from a CUDA graph (launch cost excluded, as in a decode loop
  or a compiled graph) or launched from Python each time;
- ``cold_l2_us``: the tuner's own timer (``tuning.gpu_microseconds``: L2 flushed before each launch, host
  launch time excluded), to rank launch configurations as the tuner ranks them;
- ``host_us`` / ``wall_us``: host time per call, and wall time per call including the GPU's work;
- ``timed``: the wall time of one whole step (a training step, a ``generate``, a compiling first call).

``copy_bandwidth`` and ``read_floor_us`` measure what reading memory costs in this harness.

``--smoke`` (``parse_args``): tiny shapes on any device, the CPU in CI with the kernels interpreted; times
are wall clock there and mean nothing: the run checks that the script works.
"""

from __future__ import annotations

import argparse
import functools
import operator
import statistics
import time
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"
L2_ROTATE_BYTES = 4 * 50 * 2**20  # operand copies rotated through: 4x the H100's L2
_rotate_bytes = L2_ROTATE_BYTES
# A frame past Dynamo's recompile limit runs eagerly: a benchmark of compiled code would time the wrong code.
torch._dynamo.config.fail_on_recompile_limit_hit = True


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments plus the shared ``--smoke``; without it a CUDA GPU is required."""
    global _rotate_bytes
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        _rotate_bytes = 0  # two copies of each operand: a smoke run checks the code, not the memory system
    elif not CUDA:
        parser.error("needs a CUDA GPU (--smoke runs it at tiny shapes on any device)")
    return args


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "CPU"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def copies(nbytes: int) -> int:
    """How many copies of an operand of ``nbytes`` to rotate through so that no call finds it in L2."""
    return max(2, -(-_rotate_bytes // max(nbytes, 1)))


def _call_all(fns: Sequence[Callable]) -> None:
    for f in fns:
        f()


def _graph_replay(fns: Sequence[Callable]) -> Callable[[], None]:
    """``fns`` captured once, in order, into a CUDA graph; returns its replay."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _call_all(fns)  # allocations made while warming up are not captured
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            _call_all(fns)
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def time_rotating(fns: Sequence[Callable], graph: bool, reps: int = 50) -> float:
    """Median microseconds of one call, cycling through ``fns`` (one per operand copy)."""
    _call_all(fns)  # compile, autotune, warm up
    sync()
    if not CUDA:  # smoke runs: wall clock, no graphs
        return statistics.median(wall_us(lambda: _call_all(fns), 1) / len(fns) for _ in range(min(reps, 3)))
    run = _graph_replay(fns) if graph else functools.partial(_call_all, fns)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if graph:  # the GPU sleeps while the host submits the graph: its launch latency is not timed
            torch.cuda._sleep(tuning.SLEEP_CYCLES)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def cold_l2_us(fn: Callable[[], None]) -> float:
    """GPU microseconds of one ``fn()`` as the tuner times it; on the CPU the wall clock of one call."""
    if CUDA:
        return tuning.gpu_microseconds(fn)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def host_us(fn: Callable[[], None], calls: int, warmup: int) -> float:
    """Host microseconds per call over ``calls`` calls back to back (after ``warmup`` calls and with the
    GPU idle at the start): what launching costs where the GPU's work is shorter than that."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - start) / calls * 1e6
    sync()
    return us


def wall_us(fn: Callable[[], None], calls: int) -> float:
    """Wall microseconds per call over ``calls`` calls, until the GPU has finished them."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """``(seconds, fn())`` of one call, until the GPU has finished it: a whole step (a training
    step, a generate call, a first call that compiles)."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def host_phases(fn: Callable[[], object], steps: int = 50) -> str:
    """Host time per call of ``fn`` (a compiled step that does not wait for the GPU) split at
    its compiled graphs' calls, by clocks alone (the profilers' own per-event cost inflates
    exactly these short Python phases): before the first graph is entered (Dynamo's guards, the
    pre-graph bytecode, AOTAutograd's and the backend's wrappers), inside the graphs (on CUDA
    graphs: the input checks and the replay), between them (a training step: the backward's
    autograd machinery, the optimizer), after the last (AOTAutograd's epilogue, the post-graph
    bytecode, output reconstruction). Medians over ``steps`` calls, after 3 warm-up calls."""
    from unittest import mock

    from torch._inductor.output_code import CompiledFxGraph

    marks: list = []
    inner = CompiledFxGraph.__call__

    def timed_call(self, *args, **kwargs):
        marks.append(time.perf_counter())
        try:
            return inner(self, *args, **kwargs)
        finally:
            marks.append(time.perf_counter())

    rows, graphs = [], set()
    with mock.patch.object(CompiledFxGraph, "__call__", timed_call):
        for i in range(steps + 3):
            sync()
            marks.clear()
            start = time.perf_counter()
            fn()
            end = time.perf_counter()
            if i < 3 or not marks:
                continue
            inside = sum(marks[j + 1] - marks[j] for j in range(0, len(marks), 2))
            pre, post = marks[0] - start, end - marks[-1]
            rows.append((end - start, pre, inside, end - start - pre - inside - post, post))
            graphs.add(len(marks) // 2)
    if not rows:
        return "host phases: the step ran no compiled graph"
    total, pre, inside, between, post = (1e6 * statistics.median(col) for col in zip(*rows))
    count = "/".join(map(str, sorted(graphs)))
    return (
        f"host phases per step (clocks, median of {len(rows)}): {total:.1f} us = before the graph {pre:.1f}"
        f" + in {count} graph call(s) {inside:.1f} + between them {between:.1f} + after {post:.1f}"
    )


def tb_per_s(nbytes: float, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e12


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second (TB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return tb_per_s(2 * nbytes, time_rotating([lambda: dst.copy_(src)], graph=False, reps=20))


@triton.jit
def _read_kernel(X, OUT, WORDS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # 16-byte loads over one CHUNK of words; one xor-reduced word stored per program
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for w in range(0, CHUNK, BLOCK):
        offs = base + w + tl.arange(0, BLOCK)
        acc ^= tl.load(X + offs, mask=offs < WORDS, other=0)
    tl.store(OUT + tl.program_id(0), tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_floor_us(nbytes: int, tiles: Sequence[tuple[int, int, int]]) -> tuple[float, tuple]:
    """The fastest any kernel can read ``nbytes`` in this harness: a read-only kernel, timed as
    ``time_rotating`` times (graph replay, copies rotated past the L2) for each (chunk, block, warps) of
    ``tiles``; returns the best time and its tile. Every tile's result is checked (the stored xor of each
    chunk), so no timed kernel can have skipped its loads."""
    words = nbytes // 4
    bufs = [
        torch.randint(-(2**31), 2**31 - 1, (words,), device=DEVICE, dtype=torch.int32) for _ in range(copies(nbytes))
    ]
    best = (float("inf"), None)
    for chunk, block, warps in tiles:
        grid = (triton.cdiv(words, chunk),)
        out = torch.empty(grid[0], device=DEVICE, dtype=torch.int32)
        fns = [lambda b=b: _read_kernel[grid](b, out, words, CHUNK=chunk, BLOCK=block, num_warps=warps) for b in bufs]
        us = time_rotating(fns, graph=CUDA, reps=20)
        fns[0]()
        chunks = bufs[0].cpu().split(chunk)
        want = [functools.reduce(operator.xor, c.tolist()) for c in chunks[:3]] + [
            functools.reduce(operator.xor, chunks[-1].tolist())
        ]
        got = out.cpu().tolist()
        if got[:3] + got[-1:] != want:
            raise RuntimeError(f"read kernel wrong for tile {(chunk, block, warps)}")
        best = min(best, (us, (chunk, block, warps)))
    return best
