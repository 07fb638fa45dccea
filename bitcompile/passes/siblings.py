"""Inference graphs: linears that read the same quantized activations become one matmul.

q/k/v projections, gate/up projections (and any other linears fed by one quantized input, a
fused QKV already being one) run as one packed matmul over their weights stacked along the
output rows, whose output is split back into views: one launch instead of several, and fuller
ones where a sibling is small (GQA's K/V projections). The weight cache builds the stacked
codes once (``WeightCache.get_group``) with one scale per row, each member's own, so every
output element is computed exactly as by its own linear. Members must share the quantized
input, the output dtype, the weight scheme and plain (not transposed or flattened) parameter
weights, and all have a bias or none. Deployed layers' ``linear_q`` on 2-bit packed buffers
(served by ``hoist_weights``) group the same way, their codes stacked once
(``WeightCache.get_prepacked``).
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
        if xq is None or h is None or h.view or h.members or h.scale_indices or meta(node) is None:
            continue
        groups[(_quantized_input(xq), meta(node).dtype, bias is None, False)].append((node, h))
    for node in graph.find_nodes(op="call_function", target=torch.ops.bitnet.linear_q.default):
        xq, x_scale, wq, _scale, bias = node.args[:5]
        h = hoisted.get(getattr(wq, "name", None))
        if h is None or not h.scale_indices or h.members or node.args[7:] != ("none", None) or meta(node) is None:
            continue
        groups[(_quantized_input(xq), meta(node).dtype, bias is None, True)].append((node, h))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for (_, dtype, _, _deployed), members in groups.items():
        members.sort(key=lambda member: order[member[0]])
        if len(members) > 1 and _biases_before(members, order):
            _fuse(gm, ctx, dtype, members)


def _biases_before(members, order: dict) -> bool:
    """Every member's bias is computed before the first member (where the fused matmul goes), or
    is moved there: a deployed layer casts its bias buffer (``bias.to(dtype)``) right before its own
    call. False (no fusion) for a bias computed from anything but graph inputs."""
    first = members[0][0]
    late = [b for node, _ in members if isinstance(b := _operands(node)[2], fx.Node) and order[b] > order[first]]
    if not all(all(a.op == "placeholder" for a in b.all_input_nodes) for b in late):
        return False
    for b in late:
        first.prepend(b)
    return True


def _quantized_input(xq: fx.Node):
    """``(x, bits)`` of the activation quantization ``xq`` comes from, else ``xq`` itself (a
    ``norm_quant`` that serves its linears one quantization)."""
    src = xq.args[0] if xq.target is operator.getitem else None
    if isinstance(src, fx.Node) and src.target is torch.ops.bitnet.quantize_activations.default:
        return tuple(src.args)
    return xq


def _operands(node: fx.Node) -> tuple:
    """``(xq, x_scale, bias, k)`` of a ``lowbit_linear`` or a deployed ``linear_q``."""
    if node.target is torch.ops.bitnet.linear_q.default:
        xq, x_scale, _wq, _scale, bias, k = node.args[:6]
        return xq, x_scale, bias, k
    x, _w, bias, xq, x_scale = node.args[:5]
    return xq, x_scale, bias, meta(x).shape[-1]


def _fuse(gm: fx.GraphModule, ctx: PassContext, dtype, members) -> None:
    graph = gm.graph
    first, h0 = members[0]
    xq, x_scale, _, k = _operands(first)
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        packed = graph.placeholder(f"{placeholders[h0.arg_index].name}_siblings_packed")
    with graph.inserting_after(packed):
        scale = graph.placeholder(f"{placeholders[h0.arg_index].name}_siblings_scale")
    group = HoistedWeight(
        h0.arg_index,
        h0.scheme,
        h0.per_channel,
        packed.name,
        scale.name,
        members=tuple(h.arg_index for _, h in members),
        scale_indices=tuple(i for _, h in members for i in h.scale_indices),
        k=h0.k,
    )
    ctx.hoisted.append(group)
    rows = [meta(node).shape[-1] for node, _ in members]
    with graph.inserting_before(first):
        biases = [_operands(node)[2] for node, _ in members]
        bias = None if biases[0] is None else graph.call_function(torch.cat, (biases,))
        fused = graph.call_function(
            torch.ops.bitnet.linear_q.default, (xq, x_scale, packed, scale, bias, k, dtype, "none", None)
        )
        out = meta(first)
        fused.meta["val"] = out.new_empty((*out.shape[:-1], sum(rows)))  # the lowering reads its shape
        fused.meta["bitnet_linears"] = len(members)  # what the norm fusion's report counts
        fused.meta["bitnet_members"] = [c for node, _ in members if (c := node.meta.get("bitnet_candidate"))]
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
