"""FX graph rewrites, one pattern family per module, run in order by :func:`run_passes`.

Each pass takes ``(gm, ctx)``, rewrites ``gm.graph`` in place and records every
candidate it looked at in ``ctx.report``. Passes emit ``torch.ops.bitnet`` ops only;
they never call a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from bitcompile.config import BitConfig
from bitcompile.report import Report


@dataclass
class HoistedWeight:
    """An inference-graph input fed from the packed-weight cache at call time."""

    arg_index: int  # position of the latent weight among the graph's inputs
    scheme: str
    per_channel: bool
    packed_name: str = ""  # the placeholders of the packed weights and of their scale
    scale_name: str = ""
    layout: str = "canonical"  # or "kblocked" (passes.lower_triton)
    view: str = ""  # quantize W itself, or W.flatten(1) ("flatten"), or W.t() ("t")


@dataclass
class PassContext:
    config: BitConfig
    training: bool  # grads needed: weights are re-quantized in the graph on every call
    graph_index: int = 0
    report: Report = field(default_factory=Report)
    hoisted: list[HoistedWeight] = field(default_factory=list)
    # Callables returning tensors the runtime wrapper appends to every call, after the
    # original inputs and before the hoisted weights (e.g. a custom quantizer's parameters).
    runtime_inputs: list = field(default_factory=list)


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    from bitcompile.passes import attention, batchnorm, conv, epilogue, hoist_weights, linear, lower_triton, norm_quant

    for rewrite in (
        attention.rewrite_attention,  # claims MHA / encoder-layer projections before the linear pass
        conv.rewrite_convs,
        conv.rewrite_conv1d_projections,
        linear.rewrite_linears,
        batchnorm.rewrite_batchnorms,  # folds into the lowbit ops the passes above produced
        epilogue.fuse_epilogues,  # inference: linear + activation + residual add -> linear_q
        norm_quant.fuse_norm_quant,  # (add +) norm + activation quant -> norm_quant (also in training)
        hoist_weights.hoist_packed_weights,
        lower_triton.lower_to_triton,  # CUDA, static shapes: Inductor-visible Triton ops
    ):
        rewrite(gm, ctx)
    # In-place method calls with no users (BatchNorm's ``num_batches_tracked.add_(1)``) are
    # side effects FX's default purity check does not see: keep them.
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_impure(node: fx.Node) -> bool:
    return node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))
