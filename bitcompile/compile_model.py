"""``bitcompile.compile``: compile a model in place with the bitnet backend, and find its report.

``torch.compile(model, backend="bitnet")`` returns a wrapper (an ``OptimizedModule``) whose
``forward`` is compiled; everything else it forwards to the original model. Code that calls the
model through one of the model's own methods (transformers' ``generate``, which ``pipeline`` uses)
reaches the original, uncompiled module, and code that inspects ``forward``'s signature (the
``Trainer``'s unused-column filter) sees the wrapper's ``*args, **kwargs``. Compiling in place,
as ``nn.Module.compile`` does, avoids both: the model object stays what it was, and every call
of it, from anywhere, runs the compiled code.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional

from torch import nn

from bitcompile.config import BitConfig
from bitcompile.report import Report, report_of_compile

# Models compiled by compile(): model -> (weak reference to its compiled call, its report). A
# later model.compile() with other settings replaces the compiled call, and the entry lapses.
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, Report]]" = weakref.WeakKeyDictionary()


class BitnetBackend:
    """The bitnet backend bound to one compile's options and report."""

    def __init__(self, options: dict, report: Report):
        self.options = dict(options)
        self.report = report
        self.__name__ = "bitnet"  # how torch names the backend in its logs

    def __call__(self, gm, example_inputs):
        from bitcompile.backend import bitnet_backend

        return bitnet_backend(gm, example_inputs, options=self.options or None, report=self.report)


def compile(model: nn.Module, *, dynamic: Optional[bool] = None, fullgraph: bool = False, **options) -> nn.Module:
    """Compile ``model`` in place with the bitnet backend and return it.

    ``options`` are the backend's (the fields of :class:`bitcompile.BitConfig`), checked here.
    ``dynamic`` and ``fullgraph`` are ``torch.compile``'s. The model's ``__call__`` is compiled
    (``nn.Module.compile``), so the model keeps its class, attributes, ``forward`` signature and
    state dict, and every caller runs the compiled code: a training loop, ``Trainer``, ``generate``,
    ``pipeline``. Training it is quantization-aware training; under ``no_grad`` / ``eval`` the
    linears run on packed weights. ``bitcompile.report_of(model)`` is the report of every graph
    this compile produces.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        raise TypeError("bitcompile.compile takes the model itself, not a torch.compile wrapper: "
                        "bitcompile.compile(wrapper._orig_mod, ...)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"bitcompile.compile takes an nn.Module, got {type(model).__name__}")
    BitConfig.from_options(options)  # names any bad option now, not at the first call
    report = Report(model_ref=weakref.ref(model))
    model.compile(backend=BitnetBackend(options, report), dynamic=dynamic, fullgraph=fullgraph)
    _COMPILED[model] = (weakref.ref(model._compiled_call_impl), report)
    return model


def report_of(model) -> Report:
    """The report of every graph the bitnet backend compiled for ``model`` so far.

    ``model``: a model compiled by :func:`compile`, or a ``torch.compile(model, backend="bitnet")``
    wrapper. The report fills as the model runs (a new graph for training and for eval, for each
    recompile, for each piece of a graph break or a DDP split, for ``generate``'s prefill and decode).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        backend = _compile_wrapper(model)
        fn = getattr(backend, "compiler_fn", None)
        if isinstance(fn, BitnetBackend):
            report = fn.report
        else:
            report = report_of_compile(backend) if _is_bitnet(backend) else None
        if report is None:
            raise ValueError("this wrapper was not made by torch.compile(model, backend='bitnet')")
        return report
    entry = _COMPILED.get(model) if isinstance(model, nn.Module) else None
    if entry is None or entry[0]() is not getattr(model, "_compiled_call_impl", None):
        raise ValueError(
            "this model was not compiled by bitcompile.compile (or was compiled again since): "
            "bitcompile.compile(model, **options) compiles it and keeps its report; "
            "bitcompile.report.LAST is the report of the latest compile however it was made"
        )
    return entry[1]


GENERATE_ON_WRAPPER = (
    "generate() on a torch.compile(model, backend='bitnet') wrapper would run the float model: the wrapper "
    "compiles forward() only, and generate() belongs to the original model, which calls itself uncompiled. "
    "Compile the model in place instead and call its generate(): model = bitcompile.compile(model, **options) "
    "(or model.compile(backend='bitnet')); pipelines take that model too."
)


def install_generate_guard() -> None:
    """Make ``generate`` refuse to run on bitnet wrappers, with :data:`GENERATE_ON_WRAPPER`.

    How the silent float run happens: ``OptimizedModule.__getattr__`` forwards every attribute it
    does not hold to the original module, so ``wrapper.generate`` is the original model's bound
    method. transformers' ``generate`` then calls ``self(...)`` (``self.__call__``), which is the
    original module's eager forward: no graph is captured and the tokens are the float model's.

    The guard wraps ``OptimizedModule.__getattr__`` once: for the name ``generate`` on a wrapper
    whose backend is bitnet (``bitnet`` by name, or :class:`BitnetBackend`), it returns a function
    of the same signature that raises. Every other name, and every wrapper of another backend, gets
    exactly what the original ``__getattr__`` returns. Installed when the backend module loads,
    which ``torch.compile(..., backend="bitnet")`` does before it builds the wrapper.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    original = OptimizedModule.__getattr__
    if getattr(original, "_bitcompile_generate_guard", False):
        return

    def __getattr__(self, name):
        value = original(self, name)
        if name == "generate" and callable(value):
            backend = _compile_wrapper(self)
            if backend is not None and _is_bitnet(backend):
                return _refusing(value)
        return value

    __getattr__._bitcompile_generate_guard = True
    __getattr__.__wrapped__ = original
    OptimizedModule.__getattr__ = __getattr__


def _refusing(method):
    @functools.wraps(method)
    def generate(*args, **kwargs):
        raise RuntimeError(GENERATE_ON_WRAPPER)

    return generate


def _compile_wrapper(wrapper):
    """The backend behind an ``OptimizedModule``: the ``torch._TorchCompileWrapper`` that
    ``torch.compile`` makes, or the bare function given to ``torch._dynamo.optimize``; None for
    a disabled compile."""
    from torch._dynamo.eval_frame import innermost_backend

    callback = getattr(wrapper.__dict__.get("dynamo_ctx"), "callback", None)
    return innermost_backend(callback) if callable(callback) else None


def _is_bitnet(backend) -> bool:
    from bitcompile.backend import bitnet_backend

    fn = getattr(backend, "compiler_fn", backend)
    return fn is bitnet_backend or isinstance(fn, BitnetBackend)
