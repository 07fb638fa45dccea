"""Torch's analysis of user Triton kernels, answered once per distinct launch of our kernels.

When AOTAutograd functionalizes a ``wrap_triton`` launch, and again when Inductor lowers it,
torch asks which tensor arguments the kernel reads and writes. It answers by generating the
kernel's TTIR and walking it, at every launch site: tens of milliseconds each, and a 16-layer
model's decode graph has hundreds of launches of a handful of kernels, each analysed two or three
times. The answer depends only on the kernel, its arguments' names, the dtypes of its tensor
arguments and the values of the others (the TTIR is generated from exactly these: torch replaces
every tensor by a two-element one of its dtype and every symbolic integer by 2), so for bitcompile's
own kernels it is computed once per such key and reused. Other kernels are left to torch.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Any, Callable

import torch

# Recent torch names it ``identify_accessed_tensors`` (reads and writes), older releases
# ``identify_mutated_tensors`` (writes); both take (kernel, kwargs, tma_descriptor_metadata).
ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")

STATS = {"calls": 0, "analysed": 0, "unkeyed": 0, "seconds": 0.0}  # what the benchmark's compile profile reports
_MEMOS: list = []  # every memoized analysis's answers, for summary()


class _Unkeyable(Exception):
    pass


def _argument_key(value: Any) -> tuple:
    if isinstance(value, (bool, int, float, str, type(None))):
        return type(value).__name__, value
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("symbolic",)
    if isinstance(value, torch.dtype):
        return "dtype", value
    dtype = getattr(value, "dtype", None)  # a tensor, fake tensor or Inductor TensorBox
    if isinstance(value, torch.Tensor) or type(value).__name__ == "TensorBox":
        if not isinstance(dtype, torch.dtype):
            dtype = value.get_dtype()
        return "tensor", dtype
    try:
        import sympy

        if isinstance(value, sympy.Expr):
            return ("symbolic",)
    except ImportError:
        pass
    raise _Unkeyable(type(value))


def _ours(kernel: Any) -> bool:
    """A ``JITFunction`` (or an ``Autotuner`` around one) defined in bitcompile."""
    fn = getattr(kernel, "fn", kernel)
    fn = getattr(fn, "fn", fn)
    return getattr(fn, "__module__", "").startswith("bitcompile.")


def _base(kernel: Any) -> Any:
    """The ``JITFunction`` analysed: torch wraps a launch's options (``num_warps``...) in a new
    ``Autotuner`` around the same function at every launch, and analyses its function with the
    first configuration's arguments."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def launch_key(kernel: Any, kwargs: dict, tma_descriptor_metadata: Any = None) -> tuple:
    """What the analysis of ``kernel`` launched with ``kwargs`` depends on; raises ``_Unkeyable``
    for an argument it cannot key (the launch is then analysed by torch as usual)."""
    configs = getattr(kernel, "configs", None) or []
    if configs:
        kwargs = {**kwargs, **configs[0].kwargs}
    arguments = tuple(sorted((name, _argument_key(value)) for name, value in kwargs.items()))
    return id(_base(kernel)), arguments, repr(sorted((tma_descriptor_metadata or {}).items()))


def memoized(analyse: Callable) -> Callable:
    answers: dict = {}
    kernels: dict = {}  # id -> kernel: keeps each keyed kernel alive, so its id is not reused

    @functools.wraps(analyse)
    def analysis(kernel, kwargs, *rest, **options):
        if not _ours(kernel):
            return analyse(kernel, kwargs, *rest, **options)
        try:
            key = launch_key(kernel, kwargs, rest[0] if rest else options.get("tma_descriptor_metadata"))
        except _Unkeyable as err:
            STATS["unkeyed"] += 1
            STATS["last_unkeyed"] = str(err)
            return analyse(kernel, kwargs, *rest, **options)
        STATS["calls"] += 1
        if key not in answers:
            start = time.perf_counter()
            answers[key] = analyse(kernel, kwargs, *rest, **options)
            kernels[id(_base(kernel))] = _base(kernel)
            STATS["analysed"] += 1
            STATS["seconds"] += time.perf_counter() - start
        return copy.deepcopy(answers[key])  # callers may extend what they are given

    analysis.bitcompile_memo = answers
    _MEMOS.append((answers, kernels))
    return analysis


def summary() -> str:
    """Per kernel: how many distinct launches were analysed, and the arguments whose type or
    value differed between them (what keeps launches from sharing an analysis)."""
    lines = []
    for answers, kernels in _MEMOS:
        by_kernel: dict = {}
        for kernel_id, arguments, _tma in answers:
            by_kernel.setdefault(kernel_id, []).append(dict(arguments))
        for kernel_id, launches in by_kernel.items():
            varying = {name for launch in launches for name in launch if len({str(a.get(name)) for a in launches}) > 1}
            name = getattr(getattr(kernels[kernel_id], "fn", None), "__name__", "?")  # a JITFunction's function
            lines.append(f"{name}: {len(launches)} distinct launches; differing in {sorted(varying)[:8]}")
    return "\n".join(lines)


def install() -> None:
    """Wrap torch's analysis (idempotent); a torch without it is left alone."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    for name in ANALYSES:
        analyse = getattr(wrap, name, None)
        if analyse is not None and not hasattr(analyse, "bitcompile_memo"):
            setattr(wrap, name, memoized(analyse))
