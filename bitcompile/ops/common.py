"""How the op families define their ops: each signature is written once, on the op.

``bitnet_op`` defines a custom op from an annotated function (its body is the default
implementation, the plain-torch reference) and gives it ``op.Args``, a namedtuple of the
op's parameters. Every other registration of the op (fake, CUDA kernel, the Inductor-visible
twin, a ``variant`` with the same signature) takes ``*args`` and reads them as ``op.Args(*args)``:
the dispatcher passes arguments positionally, trailing defaults omitted, which the namedtuple's
defaults fill in.
"""

from __future__ import annotations

import collections
import inspect
from typing import Callable

import torch
from torch import Tensor


def bitnet_op(name: str) -> Callable:
    """Decorator: ``torch.library.custom_op(name)`` (no mutated inputs) with ``.Args``."""

    def define(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.prototype = fn
        op.Args = arguments(fn)
        return op

    return define


def variant(name: str, op, impl: Callable):
    """A custom op with ``op``'s signature and ``Args`` (another form of the same op, e.g. on
    weights in another layout) whose default implementation is ``impl(op.Args(*args))``."""

    def body(*args):
        return impl(op.Args(*args))

    body.__signature__ = inspect.signature(op.prototype, eval_str=True)  # the schema custom_op infers
    body.__name__ = name.rpartition("::")[2]
    new = torch.library.custom_op(name, mutates_args=())(body)
    new.prototype, new.Args = body, op.Args
    return new


def arguments(fn: Callable) -> type:
    """A namedtuple class of ``fn``'s parameters, with their defaults."""
    params = list(inspect.signature(fn).parameters.values())
    defaults = [p.default for p in params if p.default is not p.empty]
    return collections.namedtuple(f"{fn.__name__}_args", [p.name for p in params], defaults=defaults)


def twin(name: str, op, impl: Callable, cpu: Callable | None = None):
    """The Inductor-visible twin of ``op``: a ``triton_op`` with ``op``'s signature whose body is
    ``impl(op.Args(*args))`` (launching kernels through ``wrap_triton``, so AOTAutograd
    decomposes it into kernel calls that Inductor launches from its own code). On the CPU it runs
    ``cpu(args)``, by default the opaque op itself (its reference).

    Defining a ``triton_op`` imports Triton, so the families define their twins on first use:
    ``twin_*()`` (cached) defines one and returns its overload, for the pass that emits it."""
    from torch.library import triton_op

    from bitcompile.ops import kernel_analysis

    kernel_analysis.install()  # torch analyses each traced launch: once per distinct launch of ours

    def body(*args):
        return impl(op.Args(*args))

    body.__signature__ = inspect.signature(op.prototype, eval_str=True)  # the schema triton_op infers
    body.__name__ = name.rpartition("::")[2]
    twin_op = triton_op(name, mutates_args=())(body)
    run_on_cpu = cpu or (lambda a: op(*a))
    twin_op.register_kernel("cpu")(lambda *args: run_on_cpu(op.Args(*args)))
    return twin_op


def require_static(t: Tensor, op: str) -> None:
    """The twins choose a kernel variant by row count at trace time: shapes must be static."""
    if not all(isinstance(d, int) for d in t.shape):
        raise NotImplementedError(
            f"bitnet::{op} needs static shapes (its kernel variant depends on the row count); "
            "with symbolic shapes use the opaque op"
        )


def packed_ternary(wq) -> bool:
    """Weights in the 2-bit packed format (ternary or binary), which the matmul kernels read;
    int8 weights are stored as int8."""
    return wq.dtype == torch.uint8


def packed_scheme(scheme: str) -> bool:
    """Weight schemes ``quantize_weights`` stores in the 2-bit packed format."""
    return scheme in ("ternary", "binary")


def quantizer_setup(ctx, inputs, output) -> None:
    # A quantizer's outputs are integers and scales: the STE gradient is produced by the
    # linear or conv op that consumes them, so nothing flows back through the quantizer.
    ctx.mark_non_differentiable(*output)
    ctx.n_inputs = len(inputs)


def no_gradient(ctx, *grads):
    return (None,) * ctx.n_inputs
