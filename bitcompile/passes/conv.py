"""Convolutions (conv1d / conv2d) -> per-sample int8 activations x packed ternary weights.

After ``normalize`` every conv is ``torch.conv1d/conv2d(x, w, b, stride, padding, dilation,
groups)`` (``nn.Conv1d/2d``, ``F.conv*``, the aten overloads, a non-transposed
``aten.convolution``), with ints, ``"valid"`` or symmetric ``"same"`` padding; other padding
modes reach us as ``F.pad`` + conv. Activations get one int8 absmax scale per sample (the only
activation scale that factors out of a convolution's sum over channels *and* kernel
positions); weights are quantized as ``W.flatten(1)`` ``[C_out, C_in/groups * kh * kw]``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from bitcompile.numerics.spec import weight_skip_reason
from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import (
    describe_weights,
    dims,
    dtype_name,
    emit_activation_quantization,
    emit_autocast_input,
    emit_weight_quantization,
    meta,
    owner,
    parameter_path,
    parameter_skip_reason,
    record,
)


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
    reason = weight_skip_reason(wm, xm, unit="channels")  # the rules reference_model shares
    if reason:
        return reason
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
        if node.op != "call_function" or node.target not in T.CONV:
            continue
        x, w, b, stride, padding, dilation, groups = node.args
        path = parameter_path(w, gm)
        xm, wm = meta(x), meta(w)
        reason = conv_skip_reason(x, w, b, path, groups, ctx)
        spatial = wm.dim() - 2 if wm is not None else 0
        if not reason:
            stride, dilation = _ints(stride, spatial), _ints(dilation, spatial)
            padding, reason = normalize_padding(padding, list(wm.shape[2:]), dilation)
        shape = f"x{dims(xm)} * W{dims(wm)}" + (
            f" stride={stride} pad={padding} dil={dilation} groups={groups}" if not reason else ""
        )
        record(
            ctx,
            f"conv{spatial}d" if spatial else "conv",
            owner(path) if path else str(node.name),
            shape,
            dtype_name(xm),
            reason,
            describe_weights(cfg) + " (per-sample activation scale)",
        )
        if reason:
            continue
        with graph.inserting_before(node):
            x = emit_autocast_input(graph, x, node)
            xq, x_scale = emit_activation_quantization(graph, x, cfg, per_sample=True)
            wq, w_scale = emit_weight_quantization(graph, graph.call_function(torch.flatten, (w, 1)), cfg)
            out = graph.call_function(
                torch.ops.bitnet.lowbit_conv.default,
                (x, w, b, xq, x_scale, wq, w_scale, stride, padding, dilation, groups),
            )
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
