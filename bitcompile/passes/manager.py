"""The passes, in order, and when each applies.

A pass is ``run(gm, ctx)``: it rewrites ``gm.graph`` in place and records every candidate
it looked at in ``ctx.report``. Passes emit ``torch.ops.bitnet`` ops only; they never call a
kernel. To add one, write a module with its ``run`` function and put a ``Pass`` in
``PASSES`` where its inputs exist (after ``normalize``, which gives every operation one
spelling, and before the passes that consume what it emits).

Activation-checkpointed regions (``torch.utils.checkpoint``, transformers'
``gradient_checkpointing_enable()``) reach us as a ``tag_activation_checkpoint`` call of a
subgraph. Without gradients checkpointing does nothing, so inference graphs inline the region
and every pass sees it. Training graphs keep the region (its forward is recomputed in the
backward) and the passes rewrite inside it too, its inputs linked to the enclosing graph's
parameters: the recomputed forward quantizes exactly as the first one did.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from bitcompile.passes import (
    attention,
    batchnorm,
    causal_mask,
    conv,
    epilogue,
    gated_quant,
    grouped_query,
    hoist_weights,
    linear,
    lower_triton,
    norm_quant,
    normalize,
    siblings,
    swiglu,
)
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import PARAMETER_OF, parameter_path


def always(ctx: PassContext) -> bool:
    return True


def fusing(ctx: PassContext) -> bool:
    return ctx.config.fuse


def inference(ctx: PassContext) -> bool:
    return not ctx.training


def gated(ctx: PassContext) -> bool:
    """SwiGLU + quantization: inference, with ``BITCOMPILE_GATED_QUANT=1`` (``passes/gated_quant.py``)."""
    return inference(ctx) and gated_quant.enabled()


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, PassContext], None]
    applies: Callable[[PassContext], bool] = always


PASSES = (
    Pass("normalize", normalize.normalize_spellings),
    Pass("attention", attention.rewrite_attention),  # claims MHA / encoder-layer projections first
    # float attention left by the pass above: constant causal masks become is_causal, and K/V heads
    # are read once, not copied per query head
    Pass("causal_mask", causal_mask.fold_constant_causal_masks, fusing),
    Pass("grouped_query", grouped_query.fold_grouped_query_attention, lambda ctx: fusing(ctx) and inference(ctx)),
    Pass("conv", conv.rewrite_convs),
    Pass("linear", linear.rewrite_linears),
    Pass("batchnorm", batchnorm.rewrite_batchnorms),  # folds into the lowbit ops the passes above emit
    Pass("hoist_weights", hoist_weights.hoist_packed_weights, inference),  # packed weights from the cache
    Pass("siblings", siblings.fuse_sibling_linears, lambda ctx: fusing(ctx) and inference(ctx)),
    Pass("epilogue", epilogue.fuse_epilogues, lambda ctx: fusing(ctx) and inference(ctx)),
    Pass("gated_quant", gated_quant.fuse_gated_quant, lambda ctx: fusing(ctx) and gated(ctx)),  # opt-in
    Pass("swiglu", swiglu.fuse_swiglu, lambda ctx: fusing(ctx) and inference(ctx) and swiglu.enabled()),  # opt-in
    Pass("norm_quant", norm_quant.fuse_norm_quant, fusing),  # (add +) norm + activation quant
    Pass("lower_triton", lower_triton.lower_to_triton, fusing),  # CUDA, static shapes
)


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    regions = _checkpointed_regions(gm)
    if regions and not ctx.training:
        for node, _ in regions:
            _inline(gm, node)
        regions = []
    for body in (_own_copy(gm, node, body) for node, body in regions):
        for p in PASSES:
            if p.applies(ctx) and p.name not in OUTER_ONLY:
                p.run(body, ctx)
        _finish(body)
    for p in PASSES:
        if p.applies(ctx):
            p.run(gm, ctx)
    _finish(gm)
    return gm


# Passes that add graph inputs, which a checkpointed region cannot receive.
OUTER_ONLY = {"hoist_weights"}
_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def _checkpointed_regions(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.GraphModule]]:
    return [(n, getattr(gm, n.args[0].target)) for n in gm.graph.find_nodes(op="call_function", target=_CHECKPOINT)]


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace a checkpointed region by its body's nodes."""
    body = getattr(gm, node.args[0].target)
    inputs = dict(zip(body.graph.find_nodes(op="placeholder"), node.args[1:]))
    with gm.graph.inserting_before(node):
        outputs = gm.graph.graph_copy(body.graph, inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _own_copy(gm: fx.GraphModule, node: fx.Node, body: fx.GraphModule) -> fx.GraphModule:
    """A copy of the region's body, installed in ``gm`` (Dynamo's graph keeps the original, which
    the fallback compiles), its placeholders fed by parameters marked with their module paths."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(body.graph, {}))
    copy = fx.GraphModule(body, graph)
    setattr(gm, node.args[0].target, copy)
    for inner, outer in zip(copy.graph.find_nodes(op="placeholder"), node.args[1:]):
        path = parameter_path(outer, gm) if isinstance(outer, fx.Node) else None
        if path is not None:
            inner.meta[PARAMETER_OF] = path
    return copy


def _finish(gm: fx.GraphModule) -> None:
    # In-place method calls with no users (BatchNorm's ``num_batches_tracked.add_(1)``) are
    # side effects FX's default purity check does not see: keep them.
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()


def _is_impure(node: fx.Node) -> bool:
    return node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))


@functools.cache
def source_hash() -> str:
    """sha256 of bitcompile's installed sources and shipped tuning tables: what the passes emit
    and what the emitted ops trace to. Keys Inductor's on-disk graph cache (``backend``)."""
    root = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for path in sorted(f for f in root.rglob("*") if f.suffix in (".py", ".json")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()
