"""``TernaryMultiheadAttention``: ternary multi-head attention.

A drop-in for ``nn.MultiheadAttention`` (same constructor arguments and state dict:
``in_proj_weight``, ``in_proj_bias``, ``out_proj``) whose projections are ternary
weights x int8 activations through the ``bitnet`` ops. The Q/K/V projection is one
fused ``[3E, E]`` weight: self-attention runs it as one packed matmul;
cross-attention (``key``/``value`` from another sequence) uses its row slices (the
packed format runs along K, so a row slice of the packed weight is the packed
slice), fusing K and V when ``key is value``. The attention maps are returned, kept
in ``last_attention`` and can be saved as a PNG heatmap
(:func:`save_attention_heatmap`, drawn with matplotlib).

The computation is ``bitcompile.ops.attention.multi_head_attention``, the same
function the backend's attention pass inserts into compiled graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.ops import WEIGHT_CACHE
from bitcompile.ops.attention import multi_head_attention


class TernaryMultiheadAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        *,
        activation_bits: Optional[int] = 8,
        attention_bits: Optional[int] = None,
        weight: str = "ternary",
        granularity: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if (kdim or embed_dim) != embed_dim or (vdim or embed_dim) != embed_dim:
            raise ValueError(
                f"the fused [3E, E] QKV projection needs kdim == vdim == embed_dim={embed_dim}; "
                f"got kdim={kdim}, vdim={vdim}"
            )
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.config = BitConfig(
            weight=weight,
            activation_bits=activation_bits,
            granularity=granularity,
            exclude=[],
            attention_bits=attention_bits,
        )
        kw = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **kw)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        self.last_attention: Optional[torch.Tensor] = None

    def _packed(self, w: torch.Tensor):
        cfg = self.config
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.ops.bitnet.quantize_weights(w, cfg.weight, cfg.per_channel)
        return WEIGHT_CACHE.get(w, cfg.weight, cfg.per_channel)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """``(output, attention)`` as ``nn.MultiheadAttention``; ``key``/``value``
        default to ``query`` (self-attention). ``attention`` is ``[B, L, S]`` (averaged
        over heads) or ``[B, H, L, S]``, or None without ``need_weights``."""
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 3:
            raise ValueError(f"TernaryMultiheadAttention needs batched 3-D inputs, got {query.dim()}-D")
        if key.shape[-1] != self.embed_dim or value.shape[-1] != self.embed_dim:
            raise ValueError(
                f"key and value must have embed_dim={self.embed_dim} features (fused QKV projection); "
                f"got {key.shape[-1]}, {value.shape[-1]}"
            )
        q = query.transpose(0, 1) if self.batch_first else query
        k = q if key is query else (key.transpose(0, 1) if self.batch_first else key)
        v = k if value is key else (q if value is query else (value.transpose(0, 1) if self.batch_first else value))
        in_proj = (self.in_proj_weight, self.in_proj_bias, *self._packed(self.in_proj_weight))
        out_proj = (self.out_proj.weight, self.out_proj.bias, *self._packed(self.out_proj.weight))
        out, weights = multi_head_attention(
            q, k, v, self.num_heads, in_proj, out_proj,
            dropout_p=self.dropout, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal, activation_bits=self.config.activation_bits,
            attention_bits=self.config.attention_bits,
        )  # fmt: skip
        if weights is not None:
            self.last_attention = weights.detach()
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def save_attention_heatmap(self, path: Union[str, Path], batch: int = 0, head: Optional[int] = None) -> Path:
        """Save the last returned attention map (of ``batch``; ``head`` if per-head) as a PNG."""
        if self.last_attention is None:
            raise RuntimeError("no attention map yet: call the layer with need_weights=True first")
        a = self.last_attention[batch]
        if a.dim() == 3:
            a = a.mean(0) if head is None else a[head]
        title = f"attention (batch {batch}, {'mean over heads' if head is None else f'head {head}'})"
        return save_attention_heatmap(a, path, title=title)

    def extra_repr(self) -> str:
        cfg = self.config
        acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
        shape = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        return f"{shape}, {cfg.weight}, {acts}"


def save_attention_heatmap(attention: torch.Tensor, path: Union[str, Path], title: str = "attention") -> Path:
    """Write a 2-D attention map ``[queries, keys]`` as a PNG heatmap with a colour bar."""
    if attention.dim() != 2:
        raise ValueError(f"attention map must be 2-D [queries, keys], got shape {tuple(attention.shape)}")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("saving heatmaps needs matplotlib: pip install 'bitcompile[plot]'") from err
    fig, ax = plt.subplots(figsize=(4.8, 4))
    image = ax.imshow(attention.detach().float().cpu().numpy(), cmap="viridis", interpolation="nearest")
    ax.set(xlabel="key", ylabel="query", title=title)
    fig.colorbar(image, ax=ax)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
