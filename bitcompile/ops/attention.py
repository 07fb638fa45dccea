"""Quantized attention: the int x int attention matmul op, and attention as plain functions of
the ``bitnet`` ops.

``quantized_attention_matmul`` multiplies two activations, both quantized to int8 with one
absmax scale per (batch, head) matrix, accumulating exactly; its STE backward uses the
quantized operands. The functions below (``multi_head_attention``, ``encoder_layer``,
``quantized_sdpa``) are what the attention pass inserts into compiled graphs (AOTAutograd
traces through them) and what the eager reference layers call, so both share one definition.

A projection is ``(w, b, wq, w_scale)``; ``wq is None`` keeps it in floating point (an excluded
module). ``attention_bits`` quantizes QK^T and attention @ V; softmax stays in floating point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bitcompile.numerics import reference as ref


@torch.library.custom_op("bitnet::quantized_attention_matmul", mutates_args=())
def quantized_attention_matmul(a: Tensor, b: Tensor, bits: int) -> Tensor:
    """``Q(a) @ Q(b)``, both int8 (``bits``) with one absmax scale per (batch, head) matrix,
    accumulated exactly; output in ``a.dtype``. Shapes as ``torch.matmul`` of >= 3-D tensors."""
    return ref.quantized_attention_matmul(a, b, bits)


@quantized_attention_matmul.register_fake
def _(a, b, bits):
    return torch.matmul(a, b.to(a.dtype))


def _attn_setup(ctx, inputs, output):
    a, b, bits = inputs
    ctx.bits = bits
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.save_for_backward(a, b)


def _attn_backward(ctx, grad):
    # STE: the gradient of Q(a) @ Q(b) with both quantizers taken as identity, using the
    # quantized operands the forward multiplied.
    a, b = ctx.saved_tensors
    qa, sa = ref.quantize_per_head(a, ctx.bits)
    qb, sb = ref.quantize_per_head(b, ctx.bits)
    a_deq, b_deq, g = qa.float() * sa, qb.float() * sb, grad.float()
    ga = gb = None
    if ctx.needs_input_grad[0]:
        ga = _unbroadcast(g @ b_deq.transpose(-2, -1), a.shape).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        gb = _unbroadcast(a_deq.transpose(-2, -1) @ g, b.shape).to(ctx.dtypes[1])
    return ga, gb, None


def _unbroadcast(g: Tensor, shape) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    dims = [i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1]
    return g.sum(dims, keepdim=True) if dims else g


quantized_attention_matmul.register_autograd(_attn_backward, setup_context=_attn_setup)


def project(
    x: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    wq: Optional[Tensor],
    w_scale: Optional[Tensor],
    activation_bits,
    rows=None,
    grad_input_bits: Optional[int] = None,
) -> Tensor:
    """``x @ w[rows]^T + b[rows]`` through ``lowbit_linear`` (rows: a slice of output features;
    packing runs along K, so a row slice of the packed weight is the packed row slice), its input
    gradient from output gradients quantized to ``grad_input_bits`` if given."""
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
        if wq is not None:
            wq, w_scale = wq[rows], (w_scale[rows] if w_scale.shape[0] > 1 else w_scale)
    if wq is None:
        return F.linear(x, w, b)
    xq = x_scale = None
    x = ref.autocast_input(x).contiguous()  # the quantizer's fake kernel assumes a contiguous result
    if activation_bits is not None:
        xq, x_scale = torch.ops.bitnet.quantize_activations(x, activation_bits)
    return torch.ops.bitnet.lowbit_linear(x, w, b, xq, x_scale, wq, w_scale, grad_input_bits)


def attention_matmul(a: Tensor, b: Tensor, attention_bits: Optional[int]) -> Tensor:
    if attention_bits is None:
        return torch.matmul(a, b)
    return torch.ops.bitnet.quantized_attention_matmul(a, b, attention_bits)


def quantized_sdpa(
    q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, attention_bits=8
):
    """``F.scaled_dot_product_attention`` with both matmuls int x int (softmax in float32)."""
    if attention_bits is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = attention_matmul(q, k.transpose(-2, -1), attention_bits) * scale
    if is_causal:
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return attention_matmul(p, v, attention_bits)


def multi_head_attention(
    query,
    key,
    value,
    num_heads,
    in_proj,
    out_proj,
    *,
    dropout_p=0.0,
    training=False,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
    activation_bits=8,
    attention_bits=None,
):
    """``F.multi_head_attention_forward`` (sequence-first ``[L, B, E]``, packed in-projection,
    no bias_k/bias_v/add_zero_attn) with quantized projections."""
    L, B, E = query.shape
    S, H = key.shape[0], num_heads
    D = E // H
    if query is key and key is value:  # self-attention: one fused QKV projection
        q, k, v = project(query, *in_proj, activation_bits).chunk(3, dim=-1)
    elif key is value:  # cross-attention sharing K/V input
        q = project(query, *in_proj, activation_bits, rows=slice(0, E))
        k, v = project(key, *in_proj, activation_bits, rows=slice(E, 3 * E)).chunk(2, dim=-1)
    else:
        q, k, v = (
            project(t, *in_proj, activation_bits, rows=slice(i * E, (i + 1) * E))
            for i, t in enumerate((query, key, value))
        )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
    )
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    if is_causal and attn_mask is None:
        attn_mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.reshape(L, B * H, D).transpose(0, 1)
    k = k.reshape(S, B * H, D).transpose(0, 1)
    v = v.reshape(S, B * H, D).transpose(0, 1)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    if not training:
        dropout_p = 0.0
    weights = None
    if need_weights:
        scores = attention_matmul(q * (1.0 / math.sqrt(D)), k.transpose(-2, -1), attention_bits)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = attention_matmul(weights, v, attention_bits).transpose(0, 1).reshape(L * B, E)
        weights = weights.view(B, H, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(B, H, -1, S)
        out = quantized_sdpa(
            q.view(B, H, L, D),
            k.view(B, H, S, D),
            v.view(B, H, S, D),
            attn_mask,
            dropout_p,
            attention_bits=attention_bits,
        )
        out = out.permute(2, 0, 1, 3).reshape(B * L, E)
    out = project(out, *out_proj, activation_bits).view(L, B, E)
    return out, weights


def encoder_layer(
    src,
    num_heads,
    in_proj,
    out_proj,
    use_gelu,
    norm_first,
    eps,
    norm1,
    norm2,
    ff1,
    ff2,
    *,
    activation_bits=8,
    attention_bits=None,
):
    """The inference fast path of ``nn.TransformerEncoderLayer`` (batch-first, no mask)."""
    B, L, E = src.shape
    H, D = num_heads, E // num_heads

    def self_attention(x):
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in project(x, *in_proj, activation_bits).chunk(3, dim=-1))
        out = quantized_sdpa(q, k, v, attention_bits=attention_bits).transpose(1, 2).reshape(B, L, E)
        return project(out, *out_proj, activation_bits)

    def feed_forward(x):
        h = project(x, *ff1, activation_bits)
        return project(F.gelu(h) if use_gelu else F.relu(h), *ff2, activation_bits)

    def ln1(x):
        return F.layer_norm(x, (E,), norm1[0], norm1[1], eps)

    def ln2(x):
        return F.layer_norm(x, (E,), norm2[0], norm2[1], eps)

    if norm_first:
        x = src + self_attention(ln1(src))
        return x + feed_forward(ln2(x))
    x = ln1(src + self_attention(src))
    return ln2(x + feed_forward(x))


# nn.TransformerEncoderLayer's inference fast path is one aten op that the attention pass
# decomposes. Some torch builds (2.11 with CUDA) have no Meta kernel for it, so Dynamo cannot
# trace it with dynamic shapes and graph-breaks, running the layer unquantized in eager. Its
# output has src's shape.
if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_transformer_encoder_layer_fwd", "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")
    _ATEN_META.impl("_transformer_encoder_layer_fwd", lambda src, *args, **kwargs: torch.empty_like(src), "Meta")
