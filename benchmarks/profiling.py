"""Where a step's time goes, by torch.profiler: device time per kernel and host time per
operator, averaged over steps (shared by the scripts that profile)."""

from __future__ import annotations

from typing import Callable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from timing import CUDA, sync


def kernel_table(fn: Callable[[], object], label: str, steps: int = 5, top: int = 25) -> str:
    """Device time per kernel per step (CPU op time where there is no GPU), the ``top`` kernels
    and the total, on CUDA the device timeline (:func:`timeline`), then the ``top`` most launched
    (a host-bound step's time follows its launch count), after three warm-up calls. Kernels
    replayed from a CUDA graph are listed where the profiler sees inside graphs (CUPTI on CUDA 12)."""
    for _ in range(3):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        sync()
    rows = [
        (e.key, (e.device_time_total if CUDA else e.self_cpu_time_total) / steps, e.count / steps)
        for e in prof.key_averages()
    ]
    rows = [r for r in rows if r[1] > 0]
    lines = [f"== {label}: per step, {steps} steps averaged"]
    lines += [f"{us:9.1f} us  x{count:g}  {name[:110]}" for name, us, count in sorted(rows, key=lambda r: -r[1])[:top]]
    lines.append(f"{sum(r[1] for r in rows):9.1f} us  total, {sum(r[2] for r in rows):g} kernels")
    if CUDA:
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
        lines.append(timeline(kernels, steps))
    lines.append("most launched, per step:")
    lines += [
        f"  x{count:<5g} {us:9.1f} us  {name[:110]}" for name, us, count in sorted(rows, key=lambda r: -r[2])[:top]
    ]
    return "\n".join(lines)


def timeline(intervals: list[tuple[float, float]], steps: int, gap_us: float = 20.0) -> str:
    """Per step, from the device's kernel intervals (µs) over ``steps`` back-to-back steps: the
    span from the first kernel's start to the last one's end, the time some kernel ran, and the
    idle rest, with the gaps longer than ``gap_us`` (waits for the host, or between graph nodes)
    counted apart. A step whose time exceeds its kernels' sum shows here where the GPU idled."""
    if not intervals:
        return "device timeline: no kernels"
    intervals = sorted(intervals)
    busy, gaps, (start, end) = 0.0, [], intervals[0]
    for s, e in intervals[1:]:
        if s > end:  # an idle stretch: close the running union
            busy, gaps = busy + end - start, gaps + [s - end]
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = max(e for _, e in intervals) - intervals[0][0]
    long = [g for g in gaps if g > gap_us]
    return (
        f"device timeline per step: span {span / steps:.1f} us, busy {busy / steps:.1f} us, idle "
        f"{(span - busy) / steps:.1f} us ({len(long) / steps:g} gaps over {gap_us:g} us: {sum(long) / steps:.1f} us)"
    )


def host_table(fn: Callable[[], object], steps: int = 20, top: int = 20) -> str:
    """Host time per step by operator and CUDA runtime call, by own CPU time (torch.profiler's
    CPU side: unlike cProfile it sees time spent in C++ and in the CUDA driver, e.g. a blocking
    call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        sync()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = [f"host time per step by own CPU time ({steps} steps averaged):"]
    lines += [f"{e.self_cpu_time_total / steps:9.1f} us  x{e.count // steps}  {e.key[:100]}" for e in rows]
    return "\n".join(lines)


def python_table(fn: Callable[[], object], steps: int = 20, top: int = 20, unit: str = "steps") -> str:
    """Host time per step by Python function, own time (cProfile: it sees which Python code runs,
    not C++; its own overhead inflates functions that make many small calls)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    body = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(body) if line.lstrip().startswith("ncalls")), 0)
    return f"python own time by function, cProfile, {steps} {unit} in all:\n" + "\n".join(body[start:])


def reset_compile_times() -> None:
    """Start :func:`compile_table`'s counts afresh (Dynamo accumulates them per process)."""
    from torch._dynamo import utils

    from bitcompile.ops import kernel_analysis

    utils.compilation_time_metrics.clear()
    kernel_analysis.STATS.update(calls=0, analysed=0, unkeyed=0, seconds=0.0)


def compile_table(label: str, first_call_s: float, min_s: float = 0.5) -> str:
    """Where a first call's compile time went, by Dynamo's and Inductor's phase timers (phases of
    at least ``min_s``, summed over every graph since :func:`reset_compile_times`); the first
    call's time beyond them is run time: Triton's compiles of kernels launched outside
    Inductor's code, tuning, CUDA-graph capture."""
    from torch._dynamo import utils

    from bitcompile.ops import kernel_analysis

    rows = sorted(((sum(v), k) for k, v in utils.compilation_time_metrics.items()), reverse=True)
    lines = [f"== first call, {label}: {first_call_s:.1f} s; compile phases (nested, summed over graphs):"]
    lines += [f"{s:9.1f} s  {name}" for s, name in rows if s >= min_s]
    stats = kernel_analysis.STATS
    lines.append(
        f"{stats['seconds']:9.1f} s  torch's analysis of bitcompile's Triton launches: {stats['analysed']} analysed,"
        f" {stats['calls'] - stats['analysed']} answered from the first analysis of the same launch,"
        f" {stats['unkeyed']} not keyed ({stats.get('last_unkeyed', '')})"
    )
    lines.append(kernel_analysis.summary())
    return "\n".join(lines)
