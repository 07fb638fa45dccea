"""Linear layers -> quantize activations, quantize + pack weights, packed low-bit matmul.

After ``normalize`` every linear is ``F.linear(x, W, b)``: ``nn.Linear``, the hand-written
``x @ W.T`` / ``torch.matmul(x, W.t())`` / ``torch.addmm(b, x, W.t())``, and transformers'
``Conv1D`` (``addmm(b, x, W)`` with ``W [in, out]``, whose weight is then ``torch.t(W)``),
with any number of leading batch dimensions. The weight must be a parameter (or the
transpose of one) of a module the options do not exclude.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from bitcompile.numerics.spec import weight_skip_reason
from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import (
    buffer_path,
    describe_weights,
    dims,
    dtype_name,
    emit_activation_quantization,
    emit_autocast_input,
    emit_lowbit_linear,
    emit_weight_quantization,
    grad_note,
    meta,
    owner,
    parameter_path,
    parameter_skip_reason,
    record,
)


def weight_parameter(w, gm: fx.GraphModule):
    """``(parameter node, module path of the parameter)`` for a weight that is a parameter or
    ``torch.t`` of one (transformers' ``Conv1D``); ``(w, None)`` otherwise."""
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target is T.TRANSPOSE_2D:
        path = parameter_path(w.args[0], gm)
        if path is not None:
            return w.args[0], path
    return w, parameter_path(w, gm) if isinstance(w, fx.Node) else None


def skip_reason(x, w, b, path, ctx: PassContext, linear_weight=None) -> str:
    """Why this linear cannot be rewritten ('' if it can). ``w`` is the weight's parameter node;
    ``linear_weight`` the weight as ``F.linear`` takes it, where that differs (a ``Conv1D``'s ``W.t()``)."""
    xm, wm = meta(x), meta(w if linear_weight is None else linear_weight)
    reason = parameter_skip_reason(path, ctx)
    if reason:
        return reason
    # A tied lm_head shares the embedding's parameter, which Dynamo names after the embedding.
    if isinstance(w, fx.Node) and any(u.target is T.EMBEDDING for u in w.users):
        return "weight is tied to an embedding table (e.g. a tied lm_head); embeddings stay in float"
    if xm is None or wm is None:
        return "no tensor metadata"
    reason = weight_skip_reason(wm, xm)  # dtype, device, empty weight: the rules reference_model shares
    if reason:
        return reason
    if wm.dim() != 2:
        return f"unsupported weight shape {tuple(wm.shape)}"
    if b is not None and meta(b) is None:
        return "bias is not a tensor"
    return ""


def rewrite_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    cfg = ctx.config
    _record_deployed(gm, ctx)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not T.LINEAR:
            continue
        x, w, b = node.args
        param, path = weight_parameter(w, gm)
        xm, wm = meta(x), meta(w)
        reason = skip_reason(x, param, b, path, ctx, linear_weight=w)
        spelled = " (transformers Conv1D: W[in, out] transposed)" if param is not w else ""
        record(
            ctx,
            "linear",
            (owner(path) or "(root)") if path else f"({node.name})",
            f"x{dims(xm)} @ W{dims(wm)}^T",
            dtype_name(xm),
            reason,
            describe_weights(cfg) + grad_note(ctx) + spelled,
            weight_bits=8 if cfg.weight == "int8" else 2,
        )
        if reason:
            continue
        if cfg.weight_quantizer is not None:  # a user quantizer object: its own forward and gradient
            from bitcompile.passes import custom_quantizer

            ctx.report.candidates[-1].reason = custom_quantizer.describe(cfg)
            custom_quantizer.rewrite_linear(gm, ctx, node, x, w, b, path)
            continue
        with graph.inserting_before(node):
            x = emit_autocast_input(graph, x, node)
            xq, x_scale = emit_activation_quantization(graph, x, cfg)
            wq, w_scale = emit_weight_quantization(graph, w, cfg)
            out = emit_lowbit_linear(graph, (x, w, b, xq, x_scale, wq, w_scale), ctx)
        out.meta.update(node.meta)
        out.meta["bitnet_candidate"] = ctx.report.candidates[-1]  # later passes add what they fused
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _record_deployed(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Deployed layers (``bitcompile.nn.PackedLinear``) already run ``linear_q`` on packed
    buffers (or, weight-only, ``weight_only_linear``): report them, and let the fusions that
    follow add to their entry."""
    deployed = [
        *gm.graph.find_nodes(op="call_function", target=torch.ops.bitnet.linear_q.default),
        *gm.graph.find_nodes(op="call_function", target=torch.ops.bitnet.weight_only_linear.default),
    ]
    for node in deployed:
        weight_only = node.target is torch.ops.bitnet.weight_only_linear.default
        codes = node.args[1 if weight_only else 2]
        path = buffer_path(codes, gm)
        if path is None:
            continue
        xm, wqm = meta(node.args[0]), meta(codes)
        k, dtype = (node.args[4], xm.dtype if xm is not None else "?") if weight_only else node.args[5:7]
        scheme = "int8" if wqm is not None and wqm.dtype == torch.int8 else "2-bit"
        shape = f"x{dims(xm)} @ W[{wqm.shape[0] if wqm is not None else '?'}, {k}]^T"
        node.meta["bitnet_candidate"] = record(
            ctx,
            "linear",
            owner(path) or "(root)",
            shape,
            str(dtype).removeprefix("torch."),
            "",
            f"deployed: {scheme} packed weights" + (", float activations (weight-only)" if weight_only else ""),
            weight_bits=8 if scheme == "int8" else 2,
        )
