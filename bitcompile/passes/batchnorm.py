"""BatchNorm after a quantized conv or linear.

Training (and any graph that needs gradients): the BN node stays, and it now reads the
quantized layer's output, so batch statistics are those of the quantized output (QAT
batch norm) and the running stats are updated exactly as in eager. Inference: an
eval-mode BN is folded into the layer's output scale and bias,

    gamma * (acc * s_x * s_w + b - mean) / sqrt(var + eps) + beta
      = acc * s_x * (s_w * g) + ((b - mean) * g + beta),   g = gamma / sqrt(var + eps)

so the eval graph has no separate BN. Train/eval switching recompiles (Dynamo guards on
``module.training``), which picks the right form.
"""

from __future__ import annotations

from operator import getitem as operator_getitem
from typing import Optional

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta, owner, parameter_path
from bitcompile.report import Candidate

QUANTIZED_LAYERS = (torch.ops.bitnet.lowbit_conv.default, torch.ops.bitnet.lowbit_linear.default)


def bn_args(node: fx.Node):
    """``(x, running_mean, running_var, weight, bias, training, eps)`` of a batch norm, else None."""
    if node.op != "call_function" or node.target is not T.BATCH_NORM:
        return None
    x, mean, var, weight, bias, training, _momentum, eps = node.args
    return x, mean, var, weight, bias, training, eps


def fold_batchnorm(w_scale, bias, mean, var, gamma, beta, eps: float):
    """New ``(w_scale [C], bias [C])`` in float32 with the BN folded in (traced by AOTAutograd)."""
    g = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        g = g * gamma.float()
    shift = -mean.float() if bias is None else bias.float() - mean.float()
    new_bias = shift * g
    if beta is not None:
        new_bias = new_bias + beta.float()
    return w_scale * g, new_bias


def _bn_module(node_args, gm) -> str:
    for n in node_args[3:5] + node_args[1:3]:
        path = parameter_path(n, gm) if isinstance(n, fx.Node) else None
        if path:
            return owner(path)
    return ""


def _fold_reason(x, mean, var, training, ctx: PassContext) -> Optional[str]:
    """None if the BN can be folded into ``x``'s producer, else why not."""
    if training is not False:
        return "QAT batch norm: batch statistics of the quantized output, running stats updated as in eager"
    if ctx.training:
        return "eval-mode BN with gradients needed: kept as its own op on the quantized output"
    if mean is None or var is None:
        return "no running statistics to fold"
    if len(x.users) != 1:
        return "the quantized layer's output has other users"
    out = meta(x)
    if x.target is torch.ops.bitnet.lowbit_linear.default and (out is None or out.dim() != 2):
        return "BN after a linear folds only on [batch, features] outputs"
    return None


def rewrite_batchnorms(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        args = bn_args(node)
        if args is None:
            continue
        x, mean, var, gamma, beta, training, eps = args
        module = _bn_module(args, gm) or node.name
        after_quantized = isinstance(x, fx.Node) and x.target in QUANTIZED_LAYERS
        reason = _fold_reason(x, mean, var, training, ctx) if after_quantized else None
        xm = meta(node)
        candidate = Candidate(
            graph=ctx.graph_index,
            op="batchnorm",
            module=module,
            shape=f"x{list(xm.shape) if xm is not None else '?'}",
            dtype=str(xm.dtype).removeprefix("torch.") if xm is not None else "?",
            rewritten=after_quantized,
            reason="input is not a quantized conv/linear: left to Inductor"
            if not after_quantized
            else (reason or "folded into the quantized layer's output scale and bias"),
        )
        ctx.report.candidates.append(candidate)
        if not after_quantized or reason is not None:
            continue  # QAT BN: the BN op itself already normalises the quantized output
        layer_args = list(x.args)
        bias_i, scale_i = 2, 6
        with graph.inserting_before(node):
            folded = graph.call_function(
                fold_batchnorm, (layer_args[scale_i], layer_args[bias_i], mean, var, gamma, beta, float(eps))
            )
            layer_args[scale_i] = graph.call_function(operator_getitem, (folded, 0))
            layer_args[bias_i] = graph.call_function(operator_getitem, (folded, 1))
            out = graph.call_function(x.target, tuple(layer_args))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        graph.erase_node(x)
