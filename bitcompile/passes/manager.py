"""The passes, in order, and when each applies.

A pass is ``run(gm, ctx)``: it rewrites ``gm.graph`` in place and records every candidate
it looked at in ``ctx.report``. Passes emit ``torch.ops.bitnet`` ops only; they never call a
kernel. To add one, write a module with its ``run`` function and put a ``Pass`` in
``PASSES`` where its inputs exist (after ``normalize``, which gives every operation one
spelling, and before the passes that consume what it emits).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.fx as fx

from bitcompile.passes import (attention, batchnorm, conv, epilogue, hoist_weights, linear, lower_triton, normalize,
                               norm_quant)
from bitcompile.passes.context import PassContext


def always(ctx: PassContext) -> bool:
    return True


def fusing(ctx: PassContext) -> bool:
    return ctx.config.fuse


def inference(ctx: PassContext) -> bool:
    return not ctx.training


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, PassContext], None]
    applies: Callable[[PassContext], bool] = always


PASSES = (
    Pass("normalize", normalize.normalize_spellings),
    Pass("attention", attention.rewrite_attention),  # claims MHA / encoder-layer projections first
    Pass("conv", conv.rewrite_convs),
    Pass("linear", linear.rewrite_linears),
    Pass("batchnorm", batchnorm.rewrite_batchnorms),  # folds into the lowbit ops the passes above emit
    Pass("epilogue", epilogue.fuse_epilogues, lambda ctx: fusing(ctx) and inference(ctx)),
    Pass("norm_quant", norm_quant.fuse_norm_quant, fusing),  # (add +) norm + activation quant
    Pass("hoist_weights", hoist_weights.hoist_packed_weights, inference),
    Pass("lower_triton", lower_triton.lower_to_triton, fusing),  # CUDA, static shapes
)


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for p in PASSES:
        if p.applies(ctx):
            p.run(gm, ctx)
    # In-place method calls with no users (BatchNorm's ``num_batches_tracked.add_(1)``) are
    # side effects FX's default purity check does not see: keep them.
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm


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
