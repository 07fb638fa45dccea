"""Launch configurations: chosen once per (kernel, shape bucket, GPU), cached on disk.

Lookup order: this process's memory -> the user's cache
(``$BITCOMPILE_CACHE_DIR`` or ``$XDG_CACHE_HOME/bitcompile`` or ``~/.cache/bitcompile``,
file ``autotune/<gpu>.json``) -> the table shipped in the package
(``bitcompile/kernels/tuned/<gpu>.json``, one for the H100; a GPU without its own starts from
its architecture's, e.g. an H200 from the H100's) -> for a shape in neither, the
configuration of the nearest tabled shape of the same kernel (log-distance over M, N, K) that
is a valid candidate here, else the kernel's default candidate: a first run never waits on
timing. ``BITCOMPILE_AUTOTUNE=1`` times every candidate of such a shape instead
(:func:`gpu_microseconds`: cold L2, the host's launch time excluded) and saves the winner in
the user cache, with progress on stderr. Without CUDA (the interpreter) the first candidate is
used. ``BITCOMPILE_RETUNE=ternary_mm,grad_input`` (or ``all``) skips the shipped entries of those
kernels, e.g. after a kernel change (set ``BITCOMPILE_AUTOTUNE=1`` with it to time them again).

``BITCOMPILE_DEBUG_DIR=<dir>`` writes the source of every specialised kernel that is
launched (Python source with its constexpr values, plus TTIR/PTX when compiled).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

_lock = threading.Lock()
_memory: dict[str, dict[str, dict]] = {}  # gpu -> key -> config
_dumped: set[str] = set()
SHIPPED_DIR = Path(__file__).with_name("tuned")
# The shipped table a GPU without its own starts from, by compute capability: the same kernels
# and candidate configurations (an H200, H100 PCIe/NVL or GH200 differs from the H100 SXM in
# bandwidth and clocks, not in what a configuration needs); the defaults would be far slower.
ARCH_TABLES = {(9, 0): "NVIDIA_H100_80GB_HBM3"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(index)).strip("_")


def gpu_name() -> str:
    # Cached: querying device properties costs far more than a small kernel launch.
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    return _cuda_name(torch.cuda.current_device())


def user_cache_file(gpu: str) -> Path:
    root = os.environ.get("BITCOMPILE_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bitcompile")
    return Path(root) / "autotune" / f"{gpu}.json"


def _read(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def shipped_table(gpu: str) -> Path:
    """The shipped table for ``gpu`` (the current CUDA device): its own, else its architecture's."""
    own = SHIPPED_DIR / f"{gpu}.json"
    if own.exists() or interpreting() or not torch.cuda.is_available():
        return own
    sibling = ARCH_TABLES.get(tuple(torch.cuda.get_device_capability()))
    return SHIPPED_DIR / f"{sibling}.json" if sibling else own


def _load(gpu: str) -> dict[str, dict]:
    if gpu not in _memory:
        retune = {k.strip() for k in os.environ.get("BITCOMPILE_RETUNE", "").split(",") if k.strip()}
        shipped = {
            key: cfg
            for key, cfg in _read(shipped_table(gpu)).items()
            if "all" not in retune and key.split(":")[0] not in retune
        }
        _memory[gpu] = {**shipped, **_read(user_cache_file(gpu))}  # user entries override shipped
    return _memory[gpu]


def _save(gpu: str, key: str, config: dict) -> None:
    path = user_cache_file(gpu)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        current = json.loads(path.read_text()) if path.exists() else {}
        current[key] = config
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:  # a read-only home must not break inference
        print(f"bitcompile: could not write autotune cache {path}: {err}", file=sys.stderr)


def choose(kernel: str, key: Sequence, candidates: Sequence[dict], run: Callable[[dict], None]) -> dict:
    """The best of ``candidates`` for ``kernel`` at ``key``; ``run(config)`` launches it once
    (on scratch buffers: it is called repeatedly while timing)."""
    if len(candidates) == 1 or interpreting() or not torch.cuda.is_available():
        return candidates[0]
    gpu = gpu_name()
    full_key = f"{kernel}:" + ",".join(map(str, key))
    hit = _memory.get(gpu, {}).get(full_key)
    if hit is not None:  # fast path, no lock
        return hit
    with _lock:
        table = _load(gpu)
        if full_key in table:
            return table[full_key]
        if not autotuning():
            chosen = _memory.setdefault(f"{gpu}:heuristic", {})
            if full_key not in chosen:
                chosen[full_key] = nearest(table, kernel, key, candidates)
            return chosen[full_key]
        print(f"bitcompile: autotuning {full_key} on {gpu} ({len(candidates)} configs)", file=sys.stderr, flush=True)
        best, best_us = None, float("inf")
        for i, config in enumerate(candidates):
            try:
                us = gpu_microseconds(lambda: run(config))
            except Exception as err:  # e.g. out of shared memory for this tile
                print(f"  [{i + 1}/{len(candidates)}] {config}: failed ({type(err).__name__})", file=sys.stderr)
                continue
            print(f"  [{i + 1}/{len(candidates)}] {config}: {us:.1f} us", file=sys.stderr, flush=True)
            if us < best_us:
                best, best_us = config, us
        if best is None:
            raise RuntimeError(f"no launch configuration of {kernel} ran for {full_key}: {list(candidates)}")
        table[full_key] = best
        _save(gpu, full_key, best)
        return best


SLEEP_CYCLES = 1_000_000  # ~0.5 ms at H100 clocks: more than a slow host's launch path


def gpu_microseconds(fn: Callable[[], None], reps: int = 15) -> float:
    """Median GPU time of one ``fn()`` launch with a cold L2, without the host's launch time.

    ``triton.testing.do_bench`` records its start event and then calls ``fn``: a launch whose
    host side outlasts the L2 flush before it (a 5-20 us kernel behind ~100 us of Python) is
    timed from the event, host latency included, and ranks configurations by noise (on a slow
    host it picks an 11.6 us GEMV tile over a 9.8 us one). Here a sleep kernel after the flush
    holds the GPU until the launch is queued."""
    fn()  # compile and warm up
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # > the L2 of current GPUs
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def autotuning() -> bool:
    """Shapes missing from the tables are timed (``BITCOMPILE_AUTOTUNE=1``), not estimated."""
    return os.environ.get("BITCOMPILE_AUTOTUNE", "0") == "1"


def nearest(table: dict[str, dict], kernel: str, key: Sequence, candidates: Sequence[dict]) -> dict:
    """The tabled configuration of ``kernel`` for the shape nearest ``key`` (same non-numeric
    key parts, such as the grad dtype; distance: summed |log2| ratios of the numeric parts) that
    is one of ``candidates``; ``candidates[0]`` where none is."""
    numbers, labels = _split_key(key)
    best, best_distance = candidates[0], float("inf")
    for full_key, config in table.items():
        name, _, rest = full_key.partition(":")
        if name != kernel or config not in candidates:
            continue
        other_numbers, other_labels = _split_key(rest.split(","))
        if other_labels != labels or len(other_numbers) != len(numbers):
            continue
        distance = sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in zip(numbers, other_numbers))
        if distance < best_distance:
            best, best_distance = config, distance
    return best


def _split_key(key: Sequence) -> tuple[list[int], list[str]]:
    numbers, labels = [], []
    for part in key:
        text = str(part)
        (numbers if text.isdigit() else labels).append(int(text) if text.isdigit() else text)
    return numbers, labels


def cached(kernel: str, key: Sequence, candidates: Sequence[dict]) -> bool:
    """Whether :func:`choose` would answer without timing."""
    if len(candidates) == 1 or interpreting() or not torch.cuda.is_available() or not autotuning():
        return True
    return f"{kernel}:" + ",".join(map(str, key)) in _load(gpu_name())


def tune_before_tracing(
    wrap: Optional[Callable], kernel: str, key: Sequence, candidates: Sequence[dict], tune: Callable[[], object]
) -> None:
    """Traced launches (``wrap`` given: ``wrap_triton``) run on fake tensors and cannot be
    timed: if :func:`choose` would have to time, ``tune()`` first runs the launcher on real
    stand-in tensors of the same shapes, which times and caches the choice."""
    if wrap is not None and not cached(kernel, key, candidates):
        with real_tensors():
            tune()


def traceable(kernel, wrap: Optional[Callable]):
    """``kernel``, or ``wrap(kernel)`` (``torch.library.wrap_triton``: a launch Inductor traces
    and then makes from its own generated code)."""
    return kernel if wrap is None else wrap(kernel)


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def use_scratch_allocator() -> None:
    """Kernels that build TMA descriptors on the device need global scratch memory from
    Triton's allocator (a context variable: set before each such launch, on the calling
    thread; Inductor sets its own before the launches it makes)."""
    import triton

    triton.set_allocator(_scratch)


def pdl(device: torch.device) -> bool:
    """``BITCOMPILE_PDL=1``: the activation quantizer and the decode matmul behind it (the GEMV,
    the Gluon GEMM) launch with programmatic dependent launch (sm_90+, untraced launches; opt-in
    until timed on a GPU): the quantizer lets the matmul start once it runs, and the matmul
    streams its first weights while the quantizer finishes, waiting (``griddepcontrol.wait``)
    only before it reads the activations."""
    return (
        os.environ.get("BITCOMPILE_PDL", "0") == "1"
        and device.type == "cuda"
        and not interpreting()
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def device_descriptors_ok() -> bool:
    """Whether a traced launch may build TMA descriptors on the device. Each program writes
    its descriptor into the launcher's global scratch, one slice per program: Triton's
    launcher (eager, and under Inductor's Python wrapper) sizes it by the grid, but the C++
    wrapper of torch 2.11 allocates one slice for the whole grid, so the other programs'
    descriptors land in unrelated memory (wrong outputs that change from call to call).
    Under the C++ wrapper such launches load by pointers instead."""
    from torch._inductor import config

    return not config.cpp_wrapper


@contextlib.contextmanager
def real_tensors():
    """Leave the tracing modes (fake tensors, functionalization) for a block that allocates
    and times real tensors while a traceable op is being traced."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def bucket(m: int) -> int:
    """Rows bucketed to a power of two so each batch size does not re-tune."""
    return 1 << max(0, (m - 1).bit_length())


def dump_source(kernel, compiled, constexprs: dict) -> None:
    """Write the specialised kernel once per specialisation when BITCOMPILE_DEBUG_DIR is set."""
    root = os.environ.get("BITCOMPILE_DEBUG_DIR")
    if not root:
        return
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    spec = "_".join(f"{k}{v}" for k, v in sorted(constexprs.items()))
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "", f"{name}__{spec}")
    if tag in _dumped:
        return
    _dumped.add(tag)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {k} = {v!r}\n" for k, v in sorted(constexprs.items()))
    source = getattr(kernel, "src", None) or ""
    (out / f"{tag}.py").write_text(f"# bitcompile kernel {name}, specialised with:\n{header}\n{source}\n")
    asm = getattr(compiled, "asm", None) or {}
    for ext in ("ttir", "ttgir", "ptx"):
        if ext in asm:
            (out / f"{tag}.{ext}").write_text(str(asm[ext]))
