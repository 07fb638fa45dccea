"""Linear layers -> quantize activations, quantize + pack weights, packed low-bit matmul.

Matches every spelling Dynamo produces for a linear with a parameter weight
(``torch._C._nn.linear`` = ``F.linear``, ``aten.linear``, an ``nn.Linear``
``call_module`` when modules are not inlined, and the hand-written forms
``x @ W.T`` / ``torch.matmul(x, W.t())`` / ``torch.addmm(b, x, W.t())``), with or
without bias and with any number of leading batch dimensions.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from bitcompile.passes import PassContext
from bitcompile.passes.graph import (dims, dtype_name, emit_activation_quantization, emit_lowbit_linear,
                                     emit_weight_quantization, grad_note, meta,
                                    owner, parameter_path, parameter_skip_reason, record)

LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
MATMUL_TARGETS = (operator.matmul, torch.matmul)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", "cuda")
EMBEDDING_TARGETS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)


def linear_args(node: fx.Node, gm: fx.GraphModule):
    """``(x, weight, bias)`` if ``node`` is a linear, else None."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[:3]
        return x, node.kwargs.get("weight", w), node.kwargs.get("bias", b)
    if node.op == "call_function" and node.target in MATMUL_TARGETS and len(node.args) == 2 and not node.kwargs:
        w = transposed_matrix(node.args[1])
        return (node.args[0], w, None) if w is not None else None
    if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3 and not node.kwargs:
        w = transposed_matrix(node.args[2])
        return (node.args[1], w, node.args[0]) if w is not None else None
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is torch.nn.Linear:
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if gm.get_submodule(node.target).bias is not None else None
        return node.args[0], w, b
    return None


def transposed_matrix(node):
    """``W`` if ``node`` is ``W.T``, ``W.t()``, ``W.mT`` or ``W.transpose(0, 1)`` of a 2-D ``W``."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    w = node.args[0]
    wm = meta(w)
    if wm is None or wm.dim() != 2:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return w
    if (node.op, node.target) in (("call_method", "t"), ("call_function", torch.t)) and len(node.args) == 1:
        return w
    if node.op == "call_method" and node.target == "transpose" and sorted(d % 2 for d in node.args[1:]) == [0, 1]:
        return w
    return None


def skip_reason(x, w, b, path, ctx: PassContext) -> str:
    """Why this linear cannot be rewritten ('' if it can)."""
    xm, wm = meta(x), meta(w)
    reason = parameter_skip_reason(path, ctx)
    if reason:
        return reason
    # A tied lm_head shares the embedding's parameter, which Dynamo names after the embedding.
    if isinstance(w, fx.Node) and any(u.target in EMBEDDING_TARGETS for u in w.users):
        return "weight is tied to an embedding table (e.g. a tied lm_head); embeddings stay in float"
    if xm is None or wm is None:
        return "no tensor metadata"
    if xm.dtype not in FLOAT_DTYPES or wm.dtype not in FLOAT_DTYPES:
        return f"unsupported dtype x={xm.dtype}, W={wm.dtype} (supported: float32, float16, bfloat16)"
    if xm.device.type not in DEVICES or wm.device.type not in DEVICES:
        return f"unsupported device {xm.device.type} (supported: cpu, cuda)"
    if wm.dim() != 2 or wm.shape[1] == 0:
        return f"unsupported weight shape {tuple(wm.shape)}"
    if b is not None and meta(b) is None:
        return "bias is not a tensor"
    return ""


def rewrite_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    cfg = ctx.config
    for node in list(graph.nodes):
        matched = linear_args(node, gm)
        if matched is None:
            continue
        x, w, b = matched
        path = parameter_path(w, gm)
        xm, wm = meta(x), meta(w)
        reason = skip_reason(x, w, b, path, ctx)
        record(ctx, "linear", (owner(path) or "(root)") if path else f"({node.name})", f"x{dims(xm)} @ W{dims(wm)}^T",
               dtype_name(xm), reason, _describe(cfg) + grad_note(ctx), weight_bits=8 if cfg.weight == "int8" else 2)
        if reason:
            continue
        if cfg.weight_quantizer is not None:  # a user quantizer object: its own forward and gradient
            from bitcompile.passes import custom_quantizer

            ctx.report.candidates[-1].reason = custom_quantizer.describe(cfg)
            custom_quantizer.rewrite_linear(gm, ctx, node, x, w, b, path)
            continue
        with graph.inserting_before(node):
            xq, x_scale = emit_activation_quantization(graph, x, cfg)
            wq, w_scale = emit_weight_quantization(graph, w, cfg)
            out = emit_lowbit_linear(graph, (x, w, b, xq, x_scale, wq, w_scale), ctx)
        out.meta.update(node.meta)
        out.meta["bitnet_candidate"] = ctx.report.candidates[-1]  # later passes add what they fused
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _describe(cfg) -> str:
    acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
    return f"{cfg.weight} W ({'per-channel' if cfg.per_channel else 'per-tensor'}), {acts}"
