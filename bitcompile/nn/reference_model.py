"""``reference_model``: the eager-reference twin of a model.

A deep copy of the model with every layer the backend would rewrite swapped for
bitcompile's eager reference layer (same ``bitnet`` ops, same quantizers), honouring the
same options (``exclude``, ``quantize_depthwise``, ``attention_bits``, ...). A compiled
model must match its twin; tests use this as the oracle for whole models. Layers the
backend leaves in float (weight not a parameter, excluded, tied to an embedding, dtype or
device it does not take, empty weight, ...) stay the original modules, for the same
reasons (``numerics.spec.weight_skip_reason`` decides for both).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bitcompile.config import BitConfig
from bitcompile.nn.bit_conv import BitConv1d, BitConv2d
from bitcompile.nn.bit_linear import BitLinear
from bitcompile.numerics.spec import weight_skip_reason
from bitcompile.ops import attention as bit_attention


def _layer_options(cfg: BitConfig) -> dict:
    return dict(weight=cfg.weight, activation_bits=cfg.activation_bits, granularity=cfg.granularity)


class BitConv1DProjection(nn.Module):
    """transformers' GPT-2 ``Conv1D`` (a linear with a ``[in, out]`` weight), quantized."""

    def __init__(self, conv1d, cfg: BitConfig):
        super().__init__()
        self.nf, self.weight, self.bias, self.config = conv1d.nf, conv1d.weight, conv1d.bias, cfg

    def forward(self, x):
        cfg, w = self.config, self.weight.t()
        x2 = x.reshape(-1, x.size(-1))
        wq, w_scale = torch.ops.bitnet.quantize_weights(w, cfg.weight, cfg.per_channel)
        out = bit_attention.project(x2, w, self.bias, wq, w_scale, cfg.activation_bits, None, cfg.grad_input_bits)
        return out.view(*x.shape[:-1], self.nf)


class _TwinConvMixin:
    """The backend leaves a conv on unbatched input in float: so does the twin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.weight.dim():
            return self._conv_forward(x, self.weight, self.bias)
        return super().forward(x)


class _TwinConv1d(_TwinConvMixin, BitConv1d):
    pass


class _TwinConv2d(_TwinConvMixin, BitConv2d):
    pass


class BitMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with quantized in/out projections (and attention matmuls)."""

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, cfg: BitConfig, in_excluded: bool, out_excluded: bool):
        layer = copy.copy(mha)
        layer.__class__ = cls
        layer.bit_config, layer.in_excluded, layer.out_excluded = cfg, in_excluded, out_excluded
        return layer

    def _projection(self, w, b, excluded):
        if excluded:
            return (w, b, None, None)
        return (w, b, *torch.ops.bitnet.quantize_weights(w, self.bit_config.weight, self.bit_config.per_channel))

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn or query.dim() != 3:
            raise ValueError(
                "BitMultiheadAttention supports batched input, kdim == vdim == embed_dim, "
                "no bias_k/bias_v/add_zero_attn"
            )
        if self.batch_first:
            if query is key and key is value:
                query = key = value = query.transpose(1, 0)
            elif key is value:
                query, key = query.transpose(1, 0), key.transpose(1, 0)
                value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        cfg = self.bit_config
        out, weights = bit_attention.multi_head_attention(
            query,
            key,
            value,
            self.num_heads,
            self._projection(self.in_proj_weight, self.in_proj_bias, self.in_excluded),
            self._projection(self.out_proj.weight, self.out_proj.bias, self.out_excluded),
            dropout_p=self.dropout,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            activation_bits=cfg.activation_bits,
            attention_bits=cfg.attention_bits,
        )
        return (out.transpose(1, 0) if self.batch_first else out), weights


class _SlowPathEncoderLayer(nn.TransformerEncoderLayer):
    """The encoder layer with its fused inference fast path off, so its sublayers
    (BitMultiheadAttention, BitLinear) run; the backend decomposes the fast path instead."""

    def forward(self, *args, **kwargs):
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().forward(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)


class _QuantizedSDPA(TorchFunctionMode):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return bit_attention.quantized_sdpa(*args, **kwargs, attention_bits=self.bits)
        return func(*args, **kwargs)


class ReferenceModel(nn.Module):
    """Wraps the swapped copy; with ``attention_bits`` runs it with quantized SDPA.
    ``skipped`` maps the path of each linear or conv left in float to the reason."""

    def __init__(self, model: nn.Module, cfg: BitConfig, skipped: dict[str, str]):
        super().__init__()
        self.model, self.config, self.skipped = model, cfg, skipped

    def forward(self, *args, **kwargs):
        bits = self.config.attention_bits
        with _QuantizedSDPA(bits) if bits is not None else contextlib.nullcontext():
            return self.model(*args, **kwargs)


def _gpt2_conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _skip_reason(module: nn.Module, kind: str, path: str, cfg: BitConfig, embedding_weights: set) -> str:
    """Why the backend leaves this linear / conv / GPT-2 ``Conv1D`` in float ('' if it rewrites it):
    the checks of the linear and conv passes, on the module instead of the traced graph."""
    weight = module.weight
    if not isinstance(weight, nn.Parameter):
        return "weight is not a parameter (computed or passed in)"
    pattern = cfg.excluded(path)
    if pattern is not None:
        return f"excluded by pattern {pattern!r}"
    if kind != "conv" and id(weight) in embedding_weights:
        return "weight is tied to an embedding table (e.g. a tied lm_head); embeddings stay in float"
    # The weight as the op takes it: Conv1D multiplies by W [in, out], i.e. F.linear with W.t().
    reason = weight_skip_reason(
        weight.t() if kind == "conv1d" else weight, unit="channels" if kind == "conv" else "features"
    )
    if reason or kind != "conv":
        return reason
    if module.groups > 1 and module.groups == module.in_channels and not cfg.quantize_depthwise:
        return "depthwise conv (groups == in_channels) kept in float; set quantize_depthwise=True to quantize it"
    odd = any(d * (k - 1) % 2 for k, d in zip(module.kernel_size, module.dilation))
    if module.padding == "same" and module.padding_mode == "zeros" and odd:
        return "padding='same' needs asymmetric padding here (even kernel extent); not supported"
    return ""


def _swap(module: nn.Module, path: str, cfg: BitConfig, embedding_weights: set, skipped: dict):
    """The reference layer for ``module`` (or None to keep it); records in ``skipped`` why a
    linear or conv stays as it is."""
    opts = _layer_options(cfg)
    conv1d_type = _gpt2_conv1d_type()
    kind = (
        "linear"
        if type(module) is nn.Linear
        else "conv"
        if type(module) in (nn.Conv1d, nn.Conv2d)
        else "conv1d"
        if conv1d_type is not None and type(module) is conv1d_type
        else None
    )
    if kind is not None:
        reason = _skip_reason(module, kind, path, cfg, embedding_weights)
        if reason:
            skipped[path] = reason
            return None
    if kind == "linear":  # the backend's linears (Conv1D's too) honour grad_input_bits; convs and attention do not
        return BitLinear.from_linear(module, **opts, grad_input_bits=cfg.grad_input_bits)
    if kind == "conv":
        return (_TwinConv1d if type(module) is nn.Conv1d else _TwinConv2d).from_conv(module, **opts)
    if kind == "conv1d":
        return BitConv1DProjection(module, cfg)
    if type(module) is nn.MultiheadAttention:
        return BitMultiheadAttention.from_mha(
            module, cfg, cfg.excluded(path) is not None, cfg.excluded(f"{path}.out_proj") is not None
        )
    if type(module) is nn.TransformerEncoderLayer:
        module.__class__ = _SlowPathEncoderLayer  # a copy already; its children are swapped below
    return None


def reference_model(model: nn.Module, **options) -> ReferenceModel:
    """The eager-reference twin of ``model`` under the backend options ``options``. Its
    ``skipped`` maps each linear / conv it keeps in float to the reason, as the backend's report."""
    cfg = BitConfig.from_options(options)
    twin = copy.deepcopy(model)
    embedding_weights = {id(m.weight) for m in twin.modules() if isinstance(m, nn.Embedding)}
    skipped: dict[str, str] = {}
    for path, module in list(twin.named_modules()):
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            new = _swap(child, child_path, cfg, embedding_weights, skipped)
            if new is not None:
                setattr(module, name, new)
    root = _swap(twin, "", cfg, embedding_weights, skipped)  # the model may itself be one layer
    return ReferenceModel(root if root is not None else twin, cfg, skipped)
