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

import dataclasses
import functools
import warnings
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

        index = self.report.graphs
        compiled = bitnet_backend(gm, example_inputs, options=self.options or None, report=self.report)
        model = self.report.model_ref() if self.report.model_ref is not None else None
        if model is None:
            return compiled
        return _full_module_paths(gm, compiled, self.report, index, model, BitConfig.from_options(self.options))


# Module paths of graphs compiled on a submodule's frame. When a submodule's call breaks the graph
# (FSDP2's hooks run eagerly, so under fully_shard every sharded block's does), Dynamo compiles
# the submodule's code as a frame of its own: parameter sources there start at that submodule, so
# the passes name `self_attn.q_proj` what the model calls `model.layers.0.self_attn.q_proj`. Its
# parameters are graph inputs, and Dynamo may run that graph for every block of the class (FSDP2
# skips guards on sharded modules): the report records each block the graph runs for, found by
# the identity of the parameters it is called with (a set lookup per call, for such graphs only).
# The passes match `exclude` against the path below the frame too, so a pattern that only the full
# path matches (`model.layers.1.mlp.up_proj`) is not honoured there: the report notes it and a
# warning names the pattern.


class SharedGraphExcludeWarning(UserWarning):
    """An ``exclude`` pattern matches a layer only by a part of its path that the graph running it
    does not see (the graph was compiled on a submodule's frame)."""


def _full_module_paths(gm, compiled, report: Report, index: int, model: nn.Module, config: BitConfig):
    """Prefix graph ``index``'s report entries with the path of the submodule its frame belongs
    to, and return ``compiled`` wrapped to add the entries of each further submodule it runs for
    (unchanged if the graph belongs to the model's own frame)."""
    from torch.nn.parallel import DistributedDataParallel

    from bitcompile.passes.graph import parameter_path

    root = model.module if isinstance(model, DistributedDataParallel) else model  # DDP: paths below it
    paths = _ParameterPaths(root)
    inputs = []  # (argument position, parameter path below the frame, tensor) of each parameter input
    for position, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        example = getattr(node.meta.get("grapharg"), "example", None)
        path = parameter_path(node, gm) if isinstance(example, nn.Parameter) else None
        if path:
            inputs.append((position, path, example))
    prefix = next((p for p in (_prefix(paths.get(t), path) for _, path, t in inputs) if p is not None), "")
    if not prefix:
        return compiled
    entries = [(c, c.module, c.reason) for c in report.candidates if c.graph == index]  # as the passes made them

    def placed(c, module: str, reason: str, block: str):
        """Report entry ``c``, which the passes made with ``module`` and ``reason``, for ``block``."""
        module = _join(block, module)
        pattern = config.excluded(module) if c.rewritten and (c.op == "linear" or c.op.startswith("conv")) else None
        if pattern is not None:
            reason += f"; not excluded by {pattern!r}: its graph sees paths below {block.rstrip('.')}"
            warnings.warn(
                f"bitnet: exclude pattern {pattern!r} matches {module} by a part of its path that the graph "
                f"running it does not see: that graph was compiled on the frame of {block.rstrip('.')} (a graph "
                "break at the submodule's call, as FSDP2's hooks make) and matches patterns against the path "
                f"below it, so {module} is quantized. A pattern that matches below the submodule works "
                f"(e.g. '*.{module.rpartition('.')[2]}', for every such block)",
                SharedGraphExcludeWarning,
                stacklevel=2,
            )
        return dataclasses.replace(c, module=module, reason=reason)

    for c, module, reason in entries:
        here = placed(c, module, reason, prefix)
        c.module, c.reason = here.module, here.reason
    position, path, _ = inputs[0]
    blocks, known = {prefix}, set()

    def run(*args):
        key = id(args[position])
        if key not in known:  # parameters this graph has not run with: record their block's layers
            known.add(key)
            block = _prefix(paths.get(args[position]), path)
            if block is not None and block not in blocks:
                blocks.add(block)
                report.candidates.extend(placed(c, module, reason, block) for c, module, reason in entries)
        return compiled(*args)

    return run


class _ParameterPaths:
    """Path of a parameter in a model, by identity (FSDP2 registers the unsharded parameters of a
    block on its modules while it runs); rebuilt when a tensor is not found."""

    def __init__(self, root: nn.Module):
        self.root = weakref.ref(root)
        self.paths: dict[int, tuple[str, weakref.ref]] = {}

    def get(self, tensor) -> Optional[str]:
        entry = self.paths.get(id(tensor))
        if (entry is None or entry[1]() is not tensor) and self.root() is not None:
            self.paths = {
                id(p): (f"{m}.{n}" if m else n, weakref.ref(p))
                for m, module in self.root().named_modules()
                for n, p in module._parameters.items()
                if p is not None
            }
            entry = self.paths.get(id(tensor))
        return entry[0] if entry is not None and entry[1]() is tensor else None


def _prefix(full: Optional[str], relative: str) -> Optional[str]:
    """``model.layers.0.`` for ``model.layers.0.mlp.up_proj.weight`` seen as ``mlp.up_proj.weight``."""
    if full is None or not full.endswith(relative) or (len(full) > len(relative) and full[-len(relative) - 1] != "."):
        return None
    return full[: len(full) - len(relative)]


def _join(prefix: str, module: str) -> str:
    """A report's module entry, made below the submodule at ``prefix``, as the model names it: a path
    gets the prefix, ``(root)`` (the frame's own module) becomes the submodule's path, and ``(node)``
    (a weight that is no parameter) stays as it is."""
    if module == "(root)":
        return prefix.rstrip(".")
    return module if module.startswith("(") else prefix + module


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
        raise TypeError(
            "bitcompile.compile takes the model itself, not a torch.compile wrapper: "
            "bitcompile.compile(wrapper._orig_mod, ...)"
        )
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
