"""Inference graphs: weight quantization moves out of the graph into a cache.

Without gradients the packed weights depend only on the parameters, so each
``quantize_weights(W)`` on a parameter input (or on ``W.flatten(1)`` of a conv weight,
``W.t()`` of a GPT-2 ``Conv1D`` weight) becomes two new graph inputs that the
backend's runtime wrapper fills from :data:`bitcompile.ops.WEIGHT_CACHE`, which
re-packs only when the parameter changed. Training graphs keep the node: there
the latent weights change every step.

Deployed layers' ``linear_q`` on 2-bit packed buffers is served the same way (the buffers
themselves, or their stacking and K-blocked layout once the later passes ask for them), so
the sibling fusion and the Triton lowering treat deployed and float models alike.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from bitcompile.passes.context import HoistedWeight, PassContext
from bitcompile.passes.graph import meta


def _parameter_view(w: fx.Node):
    """``(placeholder, view)`` for ``W``, ``torch.flatten(W, 1)`` (a conv's 2-D weight) or
    ``torch.t(W)`` (transformers' ``Conv1D``); ``(None, "")`` for anything else."""
    if w.op == "call_function" and w.target is torch.flatten and w.args[1:] == (1,) and not w.kwargs:
        return w.args[0], "flatten"
    if w.op == "call_function" and w.target is torch.t and len(w.args) == 1:
        return w.args[0], "t"
    return (w, "") if w.op in ("placeholder", "get_attr") else (None, "")


def hoist_packed_weights(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last = placeholders[-1] if placeholders else None
    hoisted = {}  # one pair of inputs per distinct weight: a module called twice, tied or shared layers
    for node in list(graph.nodes):
        if node.target is not torch.ops.bitnet.quantize_weights.default:
            continue
        w, scheme, per_channel = node.args
        w, view = _parameter_view(w)
        if w is None or w.op != "placeholder":
            continue  # a get_attr weight or a computed one: leave quantization in the graph
        key = (w, view, scheme, per_channel)
        if key not in hoisted:
            with graph.inserting_after(last):
                packed = graph.placeholder(f"{w.name}{_SUFFIX[view]}_packed")
            with graph.inserting_after(packed):
                last = scale = graph.placeholder(f"{w.name}{_SUFFIX[view]}_scale")
            ctx.hoisted.append(
                HoistedWeight(placeholders.index(w), scheme, per_channel, packed.name, scale.name, view=view)
            )
            hoisted[key] = packed, scale
        packed, scale = hoisted[key]
        for user in list(node.users):
            assert user.target is operator.getitem
            user.replace_all_uses_with(packed if user.args[1] == 0 else scale)
            graph.erase_node(user)
        graph.erase_node(node)
    _serve_deployed(graph, placeholders, ctx)


def _serve_deployed(graph: fx.Graph, placeholders: list, ctx: PassContext) -> None:
    served = {}
    for node in graph.find_nodes(op="call_function", target=torch.ops.bitnet.linear_q.default):
        codes, scale = node.args[2:4]
        if not all(isinstance(n, fx.Node) and n.op == "placeholder" for n in (codes, scale)):
            continue
        cm, sm = meta(codes), meta(scale)
        if cm is None or sm is None or cm.dtype != torch.uint8 or cm.dim() != 2:
            continue  # int8 codes: read as they are
        if (codes, scale) not in served:
            last = list(graph.find_nodes(op="placeholder"))[-1]
            with graph.inserting_after(last):
                packed = graph.placeholder(f"{codes.name}_served")
            with graph.inserting_after(packed):
                served_scale = graph.placeholder(f"{scale.name}_served")
            ctx.hoisted.append(
                HoistedWeight(
                    placeholders.index(codes),
                    "ternary",  # 2-bit codes: ternary and binary weights share the format
                    sm.numel() > 1,
                    packed.name,
                    served_scale.name,
                    scale_indices=(placeholders.index(scale),),
                    k=node.args[5],
                )
            )
            served[(codes, scale)] = packed, served_scale
        node.args = (*node.args[:2], *served[(codes, scale)], *node.args[4:])


_SUFFIX = {"": "", "flatten": "_flat", "t": "_t"}
