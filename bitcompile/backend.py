"""The ``bitnet`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="bitnet")`` works without importing bitcompile.
Dynamo hands us one FX graph per compiled region; we rewrite a copy with the
passes and give it to Inductor (``compile_fx``), on the CPU as on CUDA.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from bitcompile.config import BitConfig
from bitcompile.passes.context import ServedWeights, picker
from bitcompile.passes.manager import source_hash


class BitcompileFallbackWarning(UserWarning):
    """A pass raised; the graph was compiled without bitnet rewrites."""


_warned: set[str] = set()


def bitnet_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[dict] = None,
    report=None,
) -> Callable:
    """Compile one graph. ``report``: the compile's report, which this graph joins (``bitcompile.compile``
    passes the model's); by default the report of the ``torch.compile`` call that reached us."""
    import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
    from bitcompile import report as reports
    from bitcompile.passes import PassContext, run_passes

    config = BitConfig.from_options(options, mode)
    if report is None:
        report = reports.compile_report(sys._getframe(1))
    ctx = PassContext(
        config=config,
        training=torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs),
        graph_index=reports.next_graph_index(report),
    )
    try:
        work = run_passes(_copy(gm), ctx)
    except Exception as err:
        if config.strict:
            raise
        message = (
            f"bitnet pass failed ({type(err).__name__}: {err}); compiling graph {ctx.graph_index} without rewrites"
        )
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, BitcompileFallbackWarning, stacklevel=2)
        ctx.report.candidates.clear()
        ctx.report.fallbacks.append(message)
        ctx.hoisted.clear()
        ctx.runtime_inputs.clear()
        work = gm
    reports.publish(ctx.report, into=report, training=ctx.training)
    return _compile(work, list(example_inputs), ctx)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy the passes may rewrite, keeping what AOTAutograd reads from Dynamo's graph
    (its meta, parameter sources, each placeholder's source): without them it cannot tell
    parameters from activations, and CUDA graphs would copy every weight on every replay."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), out.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return out


def _mark_added_inputs(gm: fx.GraphModule, hoisted) -> None:
    """Placeholders the passes added have no Dynamo source; hoisted packed weights are static
    (their cache entry keeps one address until the parameter changes), so CUDA graphs do not
    copy them on every replay."""
    static = {name for h in hoisted for name in (h.packed_name, h.scale_name)}
    for node in gm.graph.find_nodes(op="placeholder"):
        if not hasattr(node, "_dynamo_source"):
            node._dynamo_source = None
        if node.name in static:
            node.meta["tensor_dict"] = {**node.meta.get("tensor_dict", {}), "_dynamo_static_input_type": "unguarded"}


def _compile(gm: fx.GraphModule, example_inputs: list, ctx) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    hoisted = list(ctx.hoisted)
    dynamo_inputs = len(example_inputs)
    # Extra graph inputs, in placeholder order: runtime inputs (e.g. a custom quantizer's
    # parameters, fetched fresh each call), then the hoisted packed weights.
    runtime_inputs = list(ctx.runtime_inputs)
    example_inputs.extend(t for fetch in runtime_inputs for t in fetch())
    # Packed weights enter as static-shape fake tensors of Dynamo's fake mode: fakified
    # later by AOTAutograd they would get fresh symbols with no Dynamo source, and any
    # guard on them (a view or split of a projection's output) breaks guard building.
    fake_mode = torch._guards.detect_fake_mode()
    for h in hoisted:
        packed = h.fetch(example_inputs)
        example_inputs.extend(
            fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t for t in packed
        )
    if "dynamo_compile_id" in gm.meta:
        _mark_added_inputs(gm, hoisted)
    read = _drop_unread_sources(gm, hoisted, dynamo_inputs)
    example_inputs = [example_inputs[i] for i in read] + example_inputs[dynamo_inputs:]
    mode = ctx.config.mode
    patches = {**(list_mode_options(mode) if mode not in (None, "default") else {}), **source_key_patch()}
    if ctx.config.cpp_wrapper:
        patches = cpp_wrapper_patches(patches)
    # AOTAutograd's on-disk cache keys on this graph, not on what our ops trace into it (their
    # STE backward; on CUDA the Triton launches with this process's tuned configurations): a hit
    # would replay what another process or an older bitcompile traced. Inductor's cache, keyed
    # on the traced graph with the kernels' sources and constants (and on bitcompile's source,
    # source_key_patch), still serves repeat compiles.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if not hoisted and not runtime_inputs:
        return compiled

    served = ServedWeights(hoisted)
    take = (lambda args: args) if len(read) == dynamo_inputs else picker(read)

    def run_with_packed_weights(*args):
        extra = [t for fetch in runtime_inputs for t in fetch()]
        return compiled(*take(args), *extra, *served(args))

    return run_with_packed_weights


def _drop_unread_sources(gm: fx.GraphModule, hoisted, count: int) -> list[int]:
    """Positions of Dynamo's ``count`` inputs the rewritten graph still reads. The weights that
    hoisted inputs are packed from (latent weights, or a deployed layer's codes and scales) are
    read only by the runtime wrapper once the graph takes their packing: handing them to the
    compiled graph too costs every call their handling by AOTAutograd's wrapper and the CUDA
    graph's input checks (a 16-layer deployed Llama: 224 of its ~400 inputs)."""
    placeholders = gm.graph.find_nodes(op="placeholder")[:count]
    unread = {i for h in hoisted for i in h.sources() if not placeholders[i].users}
    for i in unread:
        gm.graph.erase_node(placeholders[i])
    if unread:
        gm.recompile()
    return [i for i in range(count) if i not in unread]


class _SourceKey(CustomGraphPass):
    """A no-op post-grad pass (running the user's, if any) whose ``uuid`` Inductor hashes into
    its on-disk FX graph cache key. That key covers the traced graph, not our ops' fake kernels
    or eager code: after an upgrade that changed an op's output layout, a stale entry failed its
    stride check (``quantize_activations_per_sample`` going channels-last)."""

    def __init__(self, user: Optional[CustomGraphPass]):
        self.user = user

    def __call__(self, graph: fx.Graph) -> None:
        if self.user is not None:
            self.user(graph)

    def uuid(self) -> Any:
        return source_hash(), None if self.user is None else self.user.uuid()


def source_key_patch() -> dict:
    """Inductor config patch keying its FX graph cache on bitcompile's source (``_SourceKey``);
    none when the user's own post-grad pass has no ``uuid`` (Inductor bypasses its cache then)."""
    from torch._inductor import config as inductor_config

    user = inductor_config.post_grad_custom_post_pass
    if user is not None and not (isinstance(user, CustomGraphPass) and user.uuid() is not None):
        return {}
    return {"post_grad_custom_post_pass": _SourceKey(user)}


def cpp_wrapper_patches(patches: Optional[dict] = None) -> dict:
    """Inductor config patches for the C++ wrapper on top of ``patches``: ``cpp_wrapper`` and
    the Triton settings it needs (cubins stored at compile time), stated here because
    torch 2.11 applies those only while ``compile_fx`` runs, and AOTAutograd compiles the
    backward graph later, at the first backward ("CudaKernelParamCache not populated")."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import get_cpp_wrapper_config

    patches = {**(patches or {}), "cpp_wrapper": True}
    with inductor_config.patch(patches):  # the settings as they will be in the patched compile
        return {**patches, **get_cpp_wrapper_config()}


# A compiled wrapper's generate() runs the uncompiled model: make it refuse for this backend.
from bitcompile.compile_model import install_generate_guard  # noqa: E402

install_generate_guard()
