"""Inference graphs: (residual add +) RMSNorm / LayerNorm + activation quantization -> one op.

Every ``quantize_activations`` whose input is a normalization becomes ``norm_quant``,
which reads ``x`` once and writes int8 and the per-token scales; the normalized
tensor (and the residual sum ``x + r``) is written only if something else in the
graph uses it. All linears that consume the same normalized input (q/k/v,
gate/up) share one ``norm_quant``. Recognised spellings:

* ``torch.rms_norm`` / ``F.rms_norm`` and ``F.layer_norm`` over the last dimension;
* transformers' Llama / Mistral / Qwen RMSNorm written out:
  ``w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)``
  with ``h32 = h.to(torch.float32)`` (with or without the casts and the weight);
* a residual add feeding the norm, ``h = x + r``;
* under autocast, the fp32 norm output cast to bf16/fp16 before the linears.

Training graphs are fused too: there the normalized tensor is always stored (the linears'
STE routes their input gradient through it) and ``norm_quant``'s autograd rule backpropagates
through the norm and the residual add (``reference.normalize_backward``, plain torch ops that
AOTAutograd traces into the backward graph for Inductor to fuse).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta, owner, parameter_path
from bitcompile.report import Candidate


@dataclass
class Norm:
    h: fx.Node  # the tensor being normalized
    weight: Optional[fx.Node]
    bias: Optional[fx.Node]
    kind: str  # a reference.normalize kind: rms | rms_fp32 | layer
    eps: float
    internal: set  # the pattern's nodes (users of h inside the norm)
    label: str


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == T.CAST


def _last_dim_only(h: fx.Node, shape) -> bool:
    hm = meta(h)
    return hm is not None and isinstance(shape, (tuple, list)) and len(shape) == 1 and shape[0] == hm.shape[-1]


def match_norm(y: fx.Node) -> Optional[Norm]:
    if _call(y, T.RMS_NORM):
        h, shape, w, eps = y.args
        if not _last_dim_only(h, shape) or not isinstance(eps, (float, type(None))):
            return None
        eps = torch.finfo(meta(h).dtype).eps if eps is None else eps
        return Norm(h, w, None, "rms", eps, {y}, "rms_norm")
    if _call(y, T.LAYER_NORM):
        h, shape, w, b, eps = y.args
        if not _last_dim_only(h, shape) or not isinstance(eps, float):
            return None
        return Norm(h, w, b, "layer", eps, {y}, "layer_norm")
    return _manual_rms(y)


def _manual_rms(y: fx.Node) -> Optional[Norm]:
    """``w * (h32 * rsqrt(mean(h32^2, -1, keepdim) + eps)).to(h.dtype)``, casts and ``w`` optional."""
    weight, scaled = None, y
    if _call(y, T.MUL) and len(y.args) == 2:
        for w, other in (y.args, y.args[::-1]):
            wm, om = meta(w), meta(other)
            inner = other.args[0] if _cast(other) else other
            if (
                wm is not None
                and om is not None
                and wm.dim() == 1
                and wm.shape[0] == om.shape[-1]
                and _normalized(inner)
            ):
                weight, scaled = w, other
                break
    cast_back = None
    if _cast(scaled):
        cast_back, scaled = scaled, scaled.args[0]
    found = _normalized(scaled)
    if found is None:
        return None
    h32, eps, internal = found
    h = h32.args[0] if _cast(h32) else h32
    hm, h32m = meta(h), meta(h32)
    if hm is None or h32m is None or h32m.dtype != torch.float32:
        return None
    if cast_back is not None and meta(cast_back).dtype != hm.dtype:
        return None  # a cast to some other dtype: not the reference's semantics
    kind = "rms" if cast_back is not None else "rms_fp32"
    internal |= {y, scaled} | ({h32} if h32 is not h else set()) | ({cast_back} if cast_back is not None else set())
    return Norm(h, weight, None, kind, eps, internal, "RMSNorm (manual)")


def _normalized(node) -> Optional[tuple[fx.Node, float, set]]:
    """``(h32, eps, nodes)`` if ``node`` is ``h32 * rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)``."""
    if not _call(node, T.MUL) or len(node.args) != 2:
        return None
    for h32, r in (node.args, node.args[::-1]):
        if not _call(r, T.RSQRT):
            continue
        add = r.args[0]
        if not _call(add, T.ADD) or not isinstance(add.args[1], float):
            continue
        mean = add.args[0]
        if not _call(mean, T.MEAN) or not mean.kwargs.get("keepdim"):
            continue
        dim = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        if dim not in (-1, [-1], (-1,), meta(h32).dim() - 1):
            continue
        sq = mean.args[0]
        if _call(sq, T.POW) and sq.args == (h32, 2):
            return h32, float(add.args[1]), {node, r, add, mean, sq}
    return None


def _autocast_cast(y) -> bool:
    """``y`` is an fp32 tensor cast to a 16-bit float (the cast autocast puts before a linear)."""
    if not _cast(y) or len(y.args) != 2:
        return False
    src, out = meta(y.args[0]), meta(y)
    half = (torch.bfloat16, torch.float16)
    return src is not None and out is not None and src.dtype == torch.float32 and out.dtype in half


def _residual(h: fx.Node):
    """``(x, r)`` if ``h = x + r`` with operands of h's shape and dtype, else ``(h, None)``."""
    if _call(h, T.ADD) and len(h.args) == 2 and not h.kwargs:
        a, b = h.args
        ms = [meta(n) for n in (a, b, h)]
        if (
            all(m is not None for m in ms)
            and ms[0].shape == ms[1].shape == ms[2].shape
            and ms[0].dtype == ms[1].dtype == ms[2].dtype
        ):
            return a, b
    return h, None


def fuse_norm_quant(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    quantize = torch.ops.bitnet.quantize_activations.default
    done = set()
    for node in list(graph.nodes):
        if node.target is not quantize or node in done:
            continue
        y, bits = node.args
        norm = match_norm(y)
        if norm is None and _autocast_cast(y):
            # Under autocast the linears quantize the norm's fp32 output cast to bf16/fp16:
            # normalize(..., out_dtype) rounds its fp32 result once to that dtype, as the cast does.
            norm = match_norm(y.args[0])
            if norm is not None:
                norm.internal.add(y)
        if norm is None:
            continue
        quants = [u for u in y.users if u.target is quantize and u.args[1] == bits]
        done.update(quants)
        readers = sum(  # the linears reading the int8 activations (a sibling-fused matmul: its members)
            u.meta.get("bitnet_linears", 1)
            for q in quants
            for g in q.users
            if g.target is operator.getitem and g.args[1] == 0
            for u in g.users
        )
        hm = meta(norm.h)
        path = parameter_path(norm.weight, gm) if norm.weight is not None else None
        candidate = Candidate(
            graph=ctx.graph_index,
            op=f"{norm.label}+quant",
            module=(owner(path) or "(root)") if path else f"({y.name})",
            shape=f"x{list(hm.shape)}",
            dtype=str(hm.dtype).removeprefix("torch."),
            rewritten=True,
        )
        ctx.report.candidates.append(candidate)
        x, residual = _residual(norm.h)
        order = {n: i for i, n in enumerate(graph.nodes)}
        if residual is not None and any(order[u] < order[y] for u in norm.h.users if u not in norm.internal):
            x, residual = norm.h, None  # the sum is used before the norm: keep the add
        internal = norm.internal | set(quants)
        store_normed = any(u not in internal for u in y.users)
        store_sum = residual is not None and any(u not in norm.internal for u in norm.h.users)
        args = (x, residual, norm.weight, norm.bias, norm.kind, norm.eps, bits, meta(y).dtype, store_normed, store_sum)
        with graph.inserting_after(y):
            fused = graph.call_function(torch.ops.bitnet.norm_quant.default, args)
        last = fused
        if store_normed:
            with graph.inserting_after(last):
                last = normed = graph.call_function(operator.getitem, (fused, 2))
            normed.meta.update(y.meta)
            y.replace_all_uses_with(normed, delete_user_cb=lambda u: u not in internal and u is not fused)
        if store_sum:
            with graph.inserting_after(last):
                summed = graph.call_function(operator.getitem, (fused, 3))
            summed.meta.update(norm.h.meta)  # later norms may match this sum as their residual input
            norm.h.replace_all_uses_with(summed, delete_user_cb=lambda u: u not in norm.internal and u is not fused)
        for q in quants:
            q.replace_all_uses_with(fused)  # getitem 0 / 1 of either is (int8, scale)
        candidate.reason = (
            f"fused: {'residual add + ' if residual is not None else ''}{norm.kind} norm + int{bits} quant "
            f"feeding {readers} linear(s){'; normalized output also stored' if store_normed else ''}"
        )
