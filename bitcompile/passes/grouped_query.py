"""Inference graphs: grouped-query attention reads each key/value head once.

Models with fewer key/value heads than query heads (GQA: Llama 3, Mistral, Qwen2) reach
``F.scaled_dot_product_attention`` with K and V expanded to one copy per query head whenever
they pass a mask (a static KV cache always does): transformers' ``repeat_kv``, an ``expand``
and a ``reshape`` that copies the whole cache every decode step. A K/V head's G query heads
can instead ride along the query-length axis:

    q [B, Hkv*G, L, D] -> [B, Hkv, G*L, D]    against the un-expanded K, V [B, Hkv, S, D]

with a mask shared by every head and query row ([B or 1, 1, 1, S]) broadcast over the G*L
rows. Every output row is the same ``softmax(q k^T * scale + mask) v`` over the same keys, so
the result equals the expanded call's up to the attention kernel's summation order (tested
against it); the K/V copies are gone and the kernel reads each K/V head once, not G times.
Masks that differ per query row (L > 1) or per head, dropout and ``is_causal`` keep the call
as it is. Each fold is in the report (op ``attention``, nothing quantized).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import caller_module, dtype_name, meta, record, sdpa_call

# x[:, :, None, :, :]: repeat_kv's new group axis
_GROUP_AXIS = (slice(None), slice(None), None, slice(None), slice(None))


def fold_grouped_query_attention(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_function", target=T.SDPA)):
        call = sdpa_call(node)
        fold = _fold(call)
        if fold is None:
            continue
        (b, h, length, d), kv, groups = fold
        folded = (b, h // groups, groups * length)
        dv = meta(kv[1]).shape[-1]  # the output's head size is V's
        with graph.inserting_before(node):
            q = graph.call_method("reshape", (call["query"], (*folded, d)))
            kwargs = {k: call[k] for k in ("attn_mask", "scale") if call[k] is not None}
            out = graph.call_function(T.SDPA, (q, *kv), kwargs)
            back = graph.call_method("reshape", (out, (b, h, length, dv)))
        q.meta["example_value"] = meta(call["query"]).reshape(*folded, d)
        if meta(node) is not None:
            out.meta["example_value"] = meta(node).reshape(*folded, dv)
            back.meta["example_value"] = meta(node)
        module = caller_module(node)
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        for copy in dict.fromkeys((call["key"], call["value"])):  # reshape <- expand <- getitem, once unused
            for dead in (copy, copy.args[0], copy.args[0].args[0]):
                if not dead.users:
                    graph.erase_node(dead)
        record(
            ctx,
            "attention",
            module,
            f"q{[b, h, length, d]}, k/v{list(meta(kv[0]).shape)}",
            dtype_name(meta(call["query"])),
            "",
            f"float; grouped-query: {groups} query heads per K/V head, K/V not expanded",
        )


def _fold(call: dict):
    """``((B, H, L, D), (k, v), G)`` when the call reads repeat_kv's copies of K and V with a
    mask (or none) shared by every head and query row, else None."""
    if call["dropout_p"] != 0.0 or call["is_causal"] is not False or call["enable_gqa"] is not False:
        return None
    kv = [repeated(call[name]) for name in ("key", "value")]
    qm = meta(call["query"])
    if None in kv or qm is None or qm.dim() != 4 or not all(isinstance(s, int) for s in qm.shape):
        return None
    (k, gk), (v, gv) = kv
    b, h, length, d = qm.shape
    km, vm = meta(k), meta(v)
    if gk != gv or gk < 2 or h % gk or km.shape[:2] != (b, h // gk) or vm.shape[:2] != km.shape[:2]:
        return None
    mask = meta(call["attn_mask"])
    if call["attn_mask"] is not None and (mask is None or mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        return None
    return (b, h, length, d), (k, v), gk


def repeated(node):
    """``(source, G)`` if ``node`` is ``source[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv*G, S, D)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    item = expand.args[0]
    if not (isinstance(item, fx.Node) and item.target is operator.getitem and item.args[1] == _GROUP_AXIS):
        return None
    source = item.args[0]
    sm, em, om = meta(source), meta(expand), meta(node)
    if sm is None or em is None or om is None or sm.dim() != 4 or em.dim() != 5:
        return None
    if not all(isinstance(s, int) for s in (*sm.shape, *em.shape)):
        return None
    b, hkv, s, d = sm.shape
    groups = em.shape[2]
    if tuple(em.shape) != (b, hkv, groups, s, d) or tuple(om.shape) != (b, hkv * groups, s, d):
        return None
    return source, groups
