"""The ``bitnet`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="bitnet")`` works without importing bitcompile.
Dynamo hands us one FX graph per compiled region; we rewrite a copy with the
passes and give it to Inductor (``compile_fx``), on the CPU as on CUDA.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from bitcompile.config import BitConfig


class BitcompileFallbackWarning(UserWarning):
    """A pass raised; the graph was compiled without bitnet rewrites."""


_warned: set[str] = set()


def bitnet_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None, options: Optional[dict] = None
) -> Callable:
    import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
    from bitcompile import report as reports
    from bitcompile.passes import PassContext, run_passes

    config = BitConfig.from_options(options, mode)
    ctx = PassContext(
        config=config,
        training=torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs),
        graph_index=reports.next_graph_index(),
    )
    try:
        work = run_passes(_copy(gm), ctx)
    except Exception as err:
        if config.strict:
            raise
        message = f"bitnet pass failed ({type(err).__name__}: {err}); compiling graph {ctx.graph_index} without rewrites"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, BitcompileFallbackWarning, stacklevel=2)
        ctx.report.candidates.clear()
        ctx.report.fallbacks.append(message)
        ctx.hoisted.clear()
        ctx.runtime_inputs.clear()
        work = gm
    reports.publish(ctx.report)
    return _compile(work, list(example_inputs), ctx)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _compile(gm: fx.GraphModule, example_inputs: list, ctx) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from bitcompile.ops import WEIGHT_CACHE

    hoisted = list(ctx.hoisted)
    # Extra graph inputs, in placeholder order: runtime inputs (e.g. a custom quantizer's
    # parameters, fetched fresh each call), then the hoisted packed weights.
    runtime_inputs = list(ctx.runtime_inputs)
    example_inputs.extend(t for fetch in runtime_inputs for t in fetch())
    # Packed weights enter as static-shape fake tensors of Dynamo's fake mode: fakified
    # later by AOTAutograd they would get fresh symbols with no Dynamo source, and any
    # guard on them (a view or split of a projection's output) breaks guard building.
    fake_mode = torch._guards.detect_fake_mode()
    for h in hoisted:
        packed = WEIGHT_CACHE.get(example_inputs[h.arg_index], h.scheme, h.per_channel, h.layout)
        example_inputs.extend(fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t for t in packed)
    mode = ctx.config.mode
    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if not hoisted and not runtime_inputs:
        return compiled

    def run_with_packed_weights(*args):
        extra = [t for fetch in runtime_inputs for t in fetch()]
        packed = [t for h in hoisted for t in WEIGHT_CACHE.get(args[h.arg_index], h.scheme, h.per_channel, h.layout)]
        return compiled(*args, *extra, *packed)

    return run_with_packed_weights
