"""Inference graphs: linears that read the same quantized activations become one matmul.

q/k/v projections, gate/up projections (and any other linears fed by one quantized input, a
fused QKV already being one) run as one packed matmul over their weights stacked along the
output rows, whose output is split back into views: one launch instead of several, and fuller
ones where a sibling is small (GQA's K/V projections). The weight cache builds the stacked
codes once (``WeightCache.get_group``) with one scale per row, each member's own, so every
output element is computed exactly as by its own linear. Members must share the quantized
input, the output dtype, the weight scheme and plain (not transposed or flattened) parameter
weights, and all have a bias or none.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from bitcompile.passes.context import HoistedWeight, PassContext
from bitcompile.passes.graph import meta


def fuse_sibling_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    hoisted = {h.packed_name: h for h in ctx.hoisted}
    groups = defaultdict(list)
    for node in graph.find_nodes(op="call_function", target=torch.ops.bitnet.lowbit_linear.default):
        x, _w, bias, xq, x_scale, wq = node.args[:6]
        h = hoisted.get(getattr(wq, "name", None))
        if xq is None or h is None or h.view or h.members or meta(node) is None:
            continue
        groups[(_quantized_input(xq), meta(node).dtype, bias is None)].append((node, h))
    for (_, dtype, _), members in groups.items():
        if len(members) > 1:
            xq, x_scale = members[0][0].args[3:5]
            _fuse(gm, ctx, xq, x_scale, dtype, members)


def _quantized_input(xq: fx.Node):
    """``(x, bits)`` of the activation quantization ``xq`` comes from (each linear quantizes its
    own input until the norm fusion merges them), else ``xq`` itself."""
    src = xq.args[0] if xq.target is operator.getitem else None
    if isinstance(src, fx.Node) and src.target is torch.ops.bitnet.quantize_activations.default:
        return tuple(src.args)
    return xq


def _fuse(gm: fx.GraphModule, ctx: PassContext, xq, x_scale, dtype, members) -> None:
    graph = gm.graph
    first, h0 = members[0]
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        packed = graph.placeholder(f"{placeholders[h0.arg_index].name}_siblings_packed")
    with graph.inserting_after(packed):
        scale = graph.placeholder(f"{placeholders[h0.arg_index].name}_siblings_scale")
    group = HoistedWeight(
        h0.arg_index, h0.scheme, h0.per_channel, packed.name, scale.name, members=tuple(h.arg_index for _, h in members)
    )
    ctx.hoisted.append(group)
    rows = [meta(node).shape[-1] for node, _ in members]
    k = meta(first.args[0]).shape[-1]
    with graph.inserting_before(first):
        biases = [node.args[2] for node, _ in members]
        bias = None if biases[0] is None else graph.call_function(torch.cat, (biases,))
        fused = graph.call_function(
            torch.ops.bitnet.linear_q.default, (xq, x_scale, packed, scale, bias, k, dtype, "none", None)
        )
        out = meta(first)
        fused.meta["val"] = out.new_empty((*out.shape[:-1], sum(rows)))  # the lowering reads its shape
        offset = 0
        for (node, _), n in zip(members, rows):
            part = graph.call_function(torch.narrow, (fused, -1, offset, n))
            part.meta.update(node.meta)
            node.replace_all_uses_with(part)
            offset += n
    names = [_module(node) for node, _ in members]
    for node, h in members:
        candidate = node.meta.get("bitnet_candidate")
        if candidate is not None:
            candidate.reason += f", sibling-fused: {' + '.join(names)} (one matmul, {offset} rows)"
        graph.erase_node(node)
        _drop_unused(graph, ctx, h)


def _module(node: fx.Node) -> str:
    candidate = node.meta.get("bitnet_candidate")
    return candidate.module.rpartition(".")[2] if candidate is not None else node.name


def _drop_unused(graph: fx.Graph, ctx: PassContext, h: HoistedWeight) -> None:
    """A member's own hoisted inputs, once nothing reads them (a weight used elsewhere keeps them)."""
    nodes = {n.name: n for n in graph.find_nodes(op="placeholder")}
    packed, scale = nodes.get(h.packed_name), nodes.get(h.scale_name)
    if packed is not None and scale is not None and not packed.users and not scale.users and h in ctx.hoisted:
        graph.erase_node(packed)
        graph.erase_node(scale)
        ctx.hoisted.remove(h)
