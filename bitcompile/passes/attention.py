"""Attention: quantized projections of fused attention ops, and (option) int attention matmuls.

Runs before the linear pass. Separate Q/K/V/O ``nn.Linear`` projections (transformers'
models, fused QKV linears, cross-attention) are plain linears and the linear pass takes
them. Two torch ops hide their projections inside one node, so this pass claims them:

- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; Dynamo keeps it whole),
- ``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s inference
  fast path),

replacing each with :mod:`bitcompile.ops.attention`'s quantized equivalent; weight
quantization stays a graph node so inference graphs hoist it into the packed cache.

With ``attention_bits`` set, ``F.scaled_dot_product_attention`` and the manual
``softmax(q @ k.transpose(-2, -1) * scale + mask) @ v`` spelling get both matmuls as
``bitnet.quantized_attention_matmul`` (int x int, per-head scales, softmax in float).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.fx as fx

from bitcompile.ops import attention as bit_attention
from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import (
    caller_module,
    describe_weights,
    dtype_name,
    emit_weight_quantization,
    meta,
    owner,
    parameter_path,
    record,
)

MHA_SIGNATURE = inspect.signature(T.MHA)
MATMULS = (T.MATMUL, T.BMM)
# Ops allowed between the scores matmul and softmax, and between softmax and attn @ V.
SCORE_OPS = (T.MUL, T.DIV, T.ADD, T.SUB, torch.where)
SCORE_METHODS = ("masked_fill", T.CAST, "contiguous")
PROB_OPS = (T.DROPOUT, torch.dropout)
PROB_METHODS = (T.CAST, "contiguous", "type_as")


def _dtype(node) -> str:
    return dtype_name(meta(node))


def _quantized_projection(graph, gm, ctx, w, b, x_node, label: str):
    """``(w, b, wq, w_scale)`` graph values for one projection; records it in the report."""
    path = parameter_path(w, gm) if isinstance(w, fx.Node) else None
    wm = meta(w)
    module = owner(path) if path else label
    reason = ""
    if path is None:
        reason = "weight is not a parameter"
    elif ctx.config.excluded(module):
        reason = f"excluded by pattern {ctx.config.excluded(module)!r}"
    record(
        ctx,
        "linear",
        module,
        f"W{list(wm.shape) if wm is not None else '?'}",
        _dtype(x_node),
        reason,
        describe_weights(ctx.config) + f" ({label})",
    )
    if reason:
        return (w, b, None, None)
    return (w, b, *emit_weight_quantization(graph, w, ctx.config))


def _mha_unsupported(a) -> str:
    q = meta(a["query"])
    if q is None or q.dim() != 3:
        return "unbatched or untraced query (only [L, B, E] inputs are supported)"
    if a["use_separate_proj_weight"] or a["in_proj_weight"] is None:
        return "separate q/k/v projection weights (kdim/vdim != embed_dim) not supported"
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return "bias_k/bias_v/add_zero_attn not supported"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k/static_v not supported"
    return ""


def _rewrite_mha(node, gm, ctx) -> None:
    graph, cfg = gm.graph, ctx.config
    a = MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    module = owner(owner(parameter_path(a["out_proj_weight"], gm) or "attention.out_proj.weight"))
    reason = _mha_unsupported(a)
    if reason:
        record(ctx, "attention", module, "", _dtype(a["query"]), reason, "")
        return
    with graph.inserting_before(node):
        in_proj = _quantized_projection(
            graph, gm, ctx, a["in_proj_weight"], a["in_proj_bias"], a["query"], "fused q/k/v in_proj"
        )
        out_proj = _quantized_projection(
            graph, gm, ctx, a["out_proj_weight"], a["out_proj_bias"], a["query"], "out_proj"
        )
        kwargs = {
            k: a[k]
            for k in (
                "dropout_p",
                "training",
                "key_padding_mask",
                "need_weights",
                "attn_mask",
                "average_attn_weights",
                "is_causal",
            )
        }
        new = graph.call_function(
            bit_attention.multi_head_attention,
            (a["query"], a["key"], a["value"], a["num_heads"], in_proj, out_proj),
            {**kwargs, "activation_bits": cfg.activation_bits, "attention_bits": cfg.attention_bits},
        )
    record(
        ctx,
        "attention",
        module,
        "",
        _dtype(a["query"]),
        "",
        f"nn.MultiheadAttention, attention matmuls {_attn_desc(cfg)}",
    )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_encoder_layer(node, gm, ctx) -> None:
    graph, cfg = gm.graph, ctx.config
    (
        src,
        _e,
        heads,
        qkv_w,
        qkv_b,
        proj_w,
        proj_b,
        use_gelu,
        norm_first,
        eps,
        n1w,
        n1b,
        n2w,
        n2b,
        f1w,
        f1b,
        f2w,
        f2b,
        *rest,
    ) = node.args
    module = owner(owner(parameter_path(f1w, gm) or "encoder_layer.linear1.weight"))
    mask = rest[0] if rest else None
    if mask is not None:
        record(
            ctx,
            "attention",
            module,
            "",
            _dtype(src),
            "encoder-layer fast path with a mask not supported (left in float)",
            "",
        )
        return
    with graph.inserting_before(node):
        projs = [
            _quantized_projection(graph, gm, ctx, w, b, src, label)
            for w, b, label in (
                (qkv_w, qkv_b, "fused q/k/v in_proj"),
                (proj_w, proj_b, "out_proj"),
                (f1w, f1b, "linear1"),
                (f2w, f2b, "linear2"),
            )
        ]
        new = graph.call_function(
            bit_attention.encoder_layer,
            (src, heads, projs[0], projs[1], use_gelu, norm_first, eps, (n1w, n1b), (n2w, n2b), projs[2], projs[3]),
            {"activation_bits": cfg.activation_bits, "attention_bits": cfg.attention_bits},
        )
    record(
        ctx,
        "attention",
        module,
        "",
        _dtype(src),
        "",
        f"TransformerEncoderLayer fast path, attention matmuls {_attn_desc(cfg)}",
    )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _attn_desc(cfg) -> str:
    return f"int{cfg.attention_bits} x int{cfg.attention_bits} (per-head scales)" if cfg.attention_bits else "float"


def _is(node, targets, methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in targets) or (node.op == "call_method" and node.target in methods)
    )


def _scores_matmul(softmax_in: fx.Node, depth: int = 6) -> Optional[fx.Node]:
    """The ``q @ k^T`` matmul feeding softmax through scale / mask / cast ops, if any."""
    frontier = [softmax_in]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if _is(n, MATMULS):
                return n
            if _is(n, SCORE_OPS, SCORE_METHODS):
                nxt += [a for a in n.args if isinstance(a, fx.Node)]
        frontier = nxt
    return None


def _values_matmul(softmax: fx.Node, depth: int = 4) -> Optional[fx.Node]:
    """The ``p @ v`` matmul reading softmax's output (through dropout / casts) as its left operand."""
    n = softmax
    for _ in range(depth):
        if len(n.users) != 1:
            return None
        (user,) = n.users
        if _is(user, MATMULS):
            return user if user.args[0] is n else None
        if not _is(user, PROB_OPS, PROB_METHODS) or user.args[0] is not n:
            return None
        n = user
    return None


def _replace_matmul(graph, node, bits) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(
            torch.ops.bitnet.quantized_attention_matmul.default, (node.args[0], node.args[1], bits)
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_attention_matmuls(gm, ctx) -> None:
    graph, bits = gm.graph, ctx.config.attention_bits
    for node in list(graph.nodes):
        if _is(node, (T.SDPA,)):
            with graph.inserting_before(node):
                new = graph.call_function(
                    bit_attention.quantized_sdpa, node.args, {**node.kwargs, "attention_bits": bits}
                )
            record(
                ctx,
                "attention_matmul",
                caller_module(node),
                f"q{list(meta(node.args[0]).shape) if meta(node.args[0]) is not None else '?'}",
                _dtype(node),
                "",
                f"scaled_dot_product_attention -> {_attn_desc(ctx.config)}",
            )
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif _is(node, (T.SOFTMAX,)):
            scores = _scores_matmul(node.args[0] if node.args else node.kwargs["input"])
            values = _values_matmul(node)
            shape = meta(scores) if scores is not None else None
            reason = ""
            if scores is None or values is None:
                reason = "softmax not between two matmuls (not an attention pattern)"
            elif shape is None or shape.dim() < 3:
                reason = "attention scores not batched per head (< 3-D)"
            record(
                ctx,
                "attention_matmul",
                caller_module(node),
                f"scores{list(shape.shape) if shape is not None else '?'}",
                _dtype(node),
                reason,
                f"softmax(q @ k^T ...) @ v -> {_attn_desc(ctx.config)}",
            )
            if not reason:
                _replace_matmul(graph, scores, bits)
                _replace_matmul(graph, values, bits)


def rewrite_attention(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is T.MHA:
            _rewrite_mha(node, gm, ctx)
        elif node.target is T.ENCODER_LAYER_FAST_PATH:
            _rewrite_encoder_layer(node, gm, ctx)
    if ctx.config.attention_bits is not None:
        _rewrite_attention_matmuls(gm, ctx)
