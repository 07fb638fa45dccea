"""Convolutions (conv1d / conv2d) and GPT-2's ``Conv1D`` projections -> packed low-bit ops.

conv: every spelling Dynamo produces (``torch.conv1d/conv2d`` = ``F.conv1d/conv2d``, the
aten overloads, ``aten.convolution`` when not transposed, and ``nn.Conv1d/2d`` as
``call_module``), with stride, padding (ints, ``"valid"``, symmetric ``"same"``), dilation
and groups. Activations get one int8 absmax scale per sample (the only activation scale
that factors out of a convolution's sum over channels *and* kernel positions), weights
are quantized as ``W.flatten(1)`` ``[C_out, C_in/groups * kh * kw]``. Non-zero padding
modes reach us as ``F.pad`` + conv, so they are covered too.

GPT-2 ``Conv1D`` is a linear with a transposed ``[in, out]`` weight, spelled
``torch.addmm(bias, x2d, W)``: it becomes ``lowbit_linear`` on ``W.t()``.
"""
from __future__ import annotations


import torch
import torch.fx as fx

from bitcompile.passes import PassContext
from bitcompile.passes.graph import (dims, dtype_name, emit_activation_quantization, emit_lowbit_linear,
                                     emit_weight_quantization, grad_note, meta,
                                    owner, parameter_path, parameter_skip_reason, record)
from bitcompile.passes.linear import DEVICES, FLOAT_DTYPES, _describe

CONV_TARGETS = {
    torch.conv1d: 1,
    torch.conv2d: 2,
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 2,
}
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)


def conv_args(node: fx.Node, gm: fx.GraphModule):
    """``(x, weight, bias, stride, padding, dilation, groups)`` if ``node`` is a conv, else None."""
    if node.op == "call_function" and node.target in CONV_TARGETS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        vals = [node.args[i] if i < len(node.args) else node.kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
        return tuple(vals)
    if node.op == "call_function" and node.target is torch.ops.aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _out_pad, groups = node.args
        return None if transposed else (x, w, b, stride, padding, dilation, groups)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) in (torch.nn.Conv1d, torch.nn.Conv2d) and mod.padding_mode == "zeros":
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(f"{node.target}.weight")
                b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            return node.args[0], w, b, mod.stride, mod.padding, mod.dilation, mod.groups
    return None


def _ints(value, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims


def normalize_padding(padding, kernel, dilation) -> tuple[list[int] | None, str]:
    """Padding as ints per spatial dim, or (None, why) when only asymmetric padding would do."""
    if padding == "valid":
        return [0] * len(kernel), ""
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            return None, "padding='same' needs asymmetric padding here (even kernel extent); not supported"
        return [t // 2 for t in totals], ""
    return _ints(padding, len(kernel)), ""


def conv_skip_reason(x, w, b, path, groups, ctx: PassContext) -> str:
    xm, wm = meta(x), meta(w)
    reason = parameter_skip_reason(path, ctx)
    if reason:
        return reason
    if xm is None or wm is None:
        return "no tensor metadata"
    if xm.dtype not in FLOAT_DTYPES or wm.dtype not in FLOAT_DTYPES:
        return f"unsupported dtype x={xm.dtype}, W={wm.dtype} (supported: float32, float16, bfloat16)"
    if xm.device.type not in DEVICES:
        return f"unsupported device {xm.device.type} (supported: cpu, cuda)"
    if xm.dim() != wm.dim():
        return f"unbatched input ({xm.dim()}-D for a {wm.dim() - 2}-D conv); only batched input is supported"
    if not isinstance(groups, int):
        return "groups is not a constant"
    if groups > 1 and groups == xm.shape[1] and not ctx.config.quantize_depthwise:
        return "depthwise conv (groups == in_channels) kept in float; set quantize_depthwise=True to quantize it"
    if b is not None and meta(b) is None:
        return "bias is not a tensor"
    return ""


def rewrite_convs(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph, cfg = gm.graph, ctx.config
    for node in list(graph.nodes):
        matched = conv_args(node, gm)
        if matched is None:
            continue
        x, w, b, stride, padding, dilation, groups = matched
        path = parameter_path(w, gm)
        xm, wm = meta(x), meta(w)
        reason = conv_skip_reason(x, w, b, path, groups, ctx)
        spatial = wm.dim() - 2 if wm is not None else 0
        if not reason:
            stride, dilation = _ints(stride, spatial), _ints(dilation, spatial)
            padding, reason = normalize_padding(padding, list(wm.shape[2:]), dilation)
        shape = f"x{dims(xm)} * W{dims(wm)}" + (f" stride={stride} pad={padding} dil={dilation} groups={groups}"
                                                if not reason else "")
        record(ctx, f"conv{spatial}d" if spatial else "conv", owner(path) if path else str(node.name), shape,
               dtype_name(xm), reason, _describe(cfg) + " (per-sample activation scale)")
        if reason:
            continue
        with graph.inserting_before(node):
            xq, x_scale = emit_activation_quantization(graph, x, cfg, per_sample=True)
            wq, w_scale = emit_weight_quantization(graph, graph.call_function(torch.flatten, (w, 1)), cfg)
            out = graph.call_function(
                torch.ops.bitnet.lowbit_conv.default, (x, w, b, xq, x_scale, wq, w_scale, stride, padding, dilation, groups)
            )
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def rewrite_conv1d_projections(gm: fx.GraphModule, ctx: PassContext) -> None:
    """``addmm(bias, x, W)`` with a parameter ``W [in, out]`` (transformers' ``Conv1D``)."""
    graph, cfg = gm.graph, ctx.config
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ADDMM_TARGETS or len(node.args) != 3:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        b, x, w = node.args
        path = parameter_path(w, gm) if isinstance(w, fx.Node) else None
        if path is None:
            continue  # a plain addmm of activations, not a projection layer
        xm, wm = meta(x), meta(w)
        reason = conv_skip_reason(x, w, b, path, 1, ctx)
        if not reason and (wm.dim() != 2 or xm.dim() != 2):
            reason = f"unsupported addmm shapes x{list(xm.shape)} @ W{list(wm.shape)}"
        record(ctx, "conv1d_proj", owner(path), f"x{dims(xm)} @ W{dims(wm)}", dtype_name(xm), reason,
               _describe(cfg) + grad_note(ctx) + " (transformers Conv1D: addmm with W[in, out])")
        if reason:
            continue
        with graph.inserting_before(node):
            xq, x_scale = emit_activation_quantization(graph, x, cfg)
            wt = graph.call_function(torch.t, (w,))
            wq, w_scale = emit_weight_quantization(graph, wt, cfg)
            out = emit_lowbit_linear(graph, (x, wt, b, xq, x_scale, wq, w_scale), ctx)
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
