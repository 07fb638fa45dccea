"""Attention masks that are constant and causal become ``is_causal`` (and GQA's copies go).

Under ``torch.compile`` transformers cannot see whether a batch is padded, so it builds the
causal mask as a tensor (aranges, comparisons, ``&``) and hands it to
``F.scaled_dot_product_attention``; with a mask, models with fewer K/V heads than query heads
also expand K and V per query head (``repeat_kv``). When no padding mask is passed, the mask's
whole subgraph reads no graph input: this pass evaluates it once at compile time, and if it is
exactly SDPA's own causal pattern (query i sees keys j <= i), calls SDPA with ``is_causal=True``
instead, on the un-expanded K/V with ``enable_gqa=True`` where they were copies (head dims up to
256, which SDPA's fused kernels take un-expanded). That is the call transformers makes itself
when it knows there is no padding: no mask is read, no K/V copy is made, and SDPA may pick its
causal kernels. The result is the masked call's up to the attention kernel's summation order
(tested against it). Masks read from an input (padding), float masks and masks over more than
``MAX_MASK`` elements are left alone. Each rewrite is in the report (op ``attention``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import caller_module, dtype_name, meta, record, sdpa_call
from bitcompile.passes.grouped_query import repeated

MAX_MASK = 1 << 26  # elements evaluated at compile time (a 8192-token square mask)
MAX_NODES = 256  # a mask's subgraph (transformers': ~30 nodes)
MAX_GQA_HEAD_DIM = 256
_RANDOM = ("rand", "bernoulli", "dropout", "multinomial", "normal")


def fold_constant_causal_masks(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_function", target=T.SDPA)):
        call = sdpa_call(node)
        if call["attn_mask"] is None or call["is_causal"] is not False or call["enable_gqa"] is not False:
            continue
        qm, km = meta(call["query"]), meta(call["key"])
        if qm is None or km is None or not all(isinstance(s, int) for s in (*qm.shape, *km.shape)):
            continue
        if not _is_causal(call["attn_mask"], qm.shape[-2], km.shape[-2]):
            continue
        kv, groups = (call["key"], call["value"]), 1
        copies = [repeated(call[name]) for name in ("key", "value")]
        if None not in copies and copies[0][1] == copies[1][1] and _fused_gqa_ok(km, meta(call["value"])):
            kv, groups = (copies[0][0], copies[1][0]), copies[0][1]
        kwargs = {"dropout_p": call["dropout_p"], "is_causal": True, "scale": call["scale"]}
        if groups > 1:
            kwargs["enable_gqa"] = True
        with graph.inserting_before(node):
            new = graph.call_function(T.SDPA, (call["query"], *kv), kwargs)
        new.meta.update(node.meta)
        module = caller_module(node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)  # the mask's subgraph and the K/V copies go with the dead code
        note = "float; constant causal mask -> is_causal"
        record(
            ctx,
            "attention",
            module,
            f"q{list(qm.shape)}, k{list(meta(kv[0]).shape)}",
            dtype_name(qm),
            "",
            note + (f", grouped-query: {groups} query heads per K/V head, K/V not expanded" if groups > 1 else ""),
        )


def _fused_gqa_ok(key, value) -> bool:
    """SDPA's fused kernels take un-expanded K/V heads (``enable_gqa``) for head dims up to
    ``MAX_GQA_HEAD_DIM``, equal for K and V; elsewhere it would run its math kernel, so the copies
    stay (the condition transformers checks before it passes ``enable_gqa`` itself)."""
    return value is not None and key.shape[-1] == value.shape[-1] <= MAX_GQA_HEAD_DIM


def _is_causal(mask: fx.Node, rows: int, keys: int) -> bool:
    """``mask`` is a bool tensor computed from constants only, equal to ``j <= i`` in every slice."""
    mm = meta(mask)
    if mm is None or mm.dtype != torch.bool or mm.dim() < 2 or math.prod(mm.shape) > MAX_MASK:
        return False
    if tuple(mm.shape[-2:]) != (rows, keys):
        return False
    value = _evaluate(mask)
    if value is None:
        return False
    causal = torch.ones(rows, keys, dtype=torch.bool, device=value.device).tril()
    return torch.equal(value, causal.expand_as(value))


def _evaluate(node: fx.Node) -> Optional[torch.Tensor]:
    """The value of ``node`` if its whole subgraph reads no graph input (None otherwise)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op not in ("call_function", "call_method") or len(seen) >= MAX_NODES:
            return None
        if any(word in getattr(n.target, "__name__", str(n.target)) for word in _RANDOM):
            return None  # a value drawn at run time is no constant
        seen.add(n)
        stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    values: dict = {}
    with unset_fake_temporarily(), torch.no_grad():
        try:
            for n in sorted(seen, key=position.__getitem__):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                values[n] = (
                    n.target(*args, **kwargs)
                    if n.op == "call_function"
                    else getattr(args[0], n.target)(*args[1:], **kwargs)
                )
        except Exception:  # an op that cannot run outside its graph: leave the mask as it is
            return None
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None
