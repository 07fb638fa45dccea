"""The quantizers: per-token activation quantization and weight quantization + packing.

Both return integers and float32 scales and pass no gradient back: the STE lives on the
linear and conv ops that consume them. On CUDA each runs a Triton kernel where
``*_kernel_supports`` says the kernel covers the input, and the reference elsewhere.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import kblocked_columns, to_kblocked
from bitcompile.ops.common import bitnet_op, no_gradient, packed_scheme, quantizer_setup, twin


@bitnet_op("bitnet::quantize_activations")
def quantize_activations(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-token absmax quantization: ``x [..., K] -> (int8 [..., K], float32 [..., 1])``."""
    return ref.quantize_activations(x, bits)


@quantize_activations.register_fake
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def activations_kernel_supports(x: Tensor) -> bool:
    """The activation-quantization kernel takes floating rows of up to ``MAX_ROW`` elements."""
    from bitcompile.kernels.act_quant import MAX_ROW

    return x.dtype.is_floating_point and x.shape[-1] <= MAX_ROW


@quantize_activations.register_kernel("cuda")
def _(x, bits):
    from bitcompile.kernels.act_quant import norm_quant as kernel

    if not activations_kernel_supports(x):
        return ref.quantize_activations(x, bits)
    q, s, _, _ = kernel(x, bits)
    return q, s


@bitnet_op("bitnet::quantize_weights")
def quantize_weights(w: Tensor, scheme: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """``W [N, K] -> (packed uint8 [N, ceil(K/4)] | int8 [N, K], float32 scale [N] | [1])``."""
    return ref.quantize_weights(w, scheme, per_channel)


@quantize_weights.register_fake
def _(w, scheme, per_channel):
    n, k = w.shape
    wq = (
        w.new_empty((n, k), dtype=torch.int8) if scheme == "int8" else w.new_empty((n, (k + 3) // 4), dtype=torch.uint8)
    )
    return wq, w.new_empty((n if per_channel else 1,), dtype=torch.float32)


def weights_kernel_supports(w: Tensor, scheme: str) -> bool:
    """The weight-pack kernel quantizes 2-D floating weights to the 2-bit schemes."""
    from bitcompile.kernels.weight_pack import SCHEMES

    return scheme in SCHEMES and w.dim() == 2 and w.dtype.is_floating_point


@quantize_weights.register_kernel("cuda")
def _(w, scheme, per_channel):
    from bitcompile.kernels.weight_pack import quantize_pack

    if not weights_kernel_supports(w, scheme):
        return ref.quantize_weights(w, scheme, per_channel)
    return quantize_pack(w, scheme, per_channel)


@bitnet_op("bitnet::quantize_weights_kblocked")
def quantize_weights_kblocked(w: Tensor, scheme: str, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_weights`` (2-bit schemes) and the same codes in the matmul kernels' K-blocked
    layout: ``(packed [N, ceil(K/4)], scale, K-blocked [N, kblocked_columns(K)])``. A QAT step
    needs both (the input gradient reads the first, the forward matmul the second), and on
    CUDA one launch of the pack kernel writes both."""
    if not packed_scheme(scheme):
        raise ValueError(f"quantize_weights_kblocked takes the 2-bit schemes ternary, binary (got {scheme!r})")
    wq, scale = ref.quantize_weights(w, scheme, per_channel)
    return wq, scale, to_kblocked(wq, w.shape[1])


@quantize_weights_kblocked.register_fake
def _kblocked_fake(w, scheme, per_channel):
    n, k = w.shape
    return (
        w.new_empty((n, (k + 3) // 4), dtype=torch.uint8),
        w.new_empty((n if per_channel else 1,), dtype=torch.float32),
        w.new_empty((n, kblocked_columns(k)), dtype=torch.uint8),
    )


@quantize_weights_kblocked.register_kernel("cuda")
def _(w, scheme, per_channel):
    from bitcompile.kernels.weight_pack import quantize_pack_both

    if not weights_kernel_supports(w, scheme):
        return quantize_weights_kblocked.prototype(w, scheme, per_channel)
    return quantize_pack_both(w, scheme, per_channel)


@bitnet_op("bitnet::quantize_weights_group")
def quantize_weights_group(weights: list[Tensor], scheme: str, per_channel: bool) -> list[Tensor]:
    """``quantize_weights_kblocked`` of each weight, flattened: ``[codes_0, scale_0, kblocked_0,
    codes_1, ...]``. On CUDA one abs-sum and one pack launch for all of them
    (``kernels.weight_pack_group``) where ``group_kernel_supports``; a QAT step's weights at once."""
    return [t for w in weights for t in quantize_weights_kblocked.prototype(w, scheme, per_channel)]


@quantize_weights_group.register_fake
def _(weights, scheme, per_channel):
    return [t for w in weights for t in _kblocked_fake(w, scheme, per_channel)]


def group_kernel_supports(weights: list[Tensor], scheme: str) -> bool:
    """The grouped pack kernel takes weights the single one takes, of one dtype and device."""
    first = weights[0] if weights else None
    return bool(weights) and all(
        weights_kernel_supports(w, scheme) and w.dtype == first.dtype and w.device == first.device for w in weights
    )


@quantize_weights_group.register_kernel("cuda")
def _(weights, scheme, per_channel):
    from bitcompile.kernels.weight_pack_group import quantize_pack_group

    # (the kernels' table is copied from the host per call: not inside a CUDA graph capture)
    if not group_kernel_supports(weights, scheme) or torch.cuda.is_current_stream_capturing():
        return [t for w in weights for t in torch.ops.bitnet.quantize_weights_kblocked(w, scheme, per_channel)]
    return [t for entry in quantize_pack_group(weights, scheme, per_channel) for t in entry]


for _quantizer in (quantize_activations, quantize_weights, quantize_weights_kblocked, quantize_weights_group):
    _quantizer.register_autograd(no_gradient, setup_context=quantizer_setup)


def weights_traced(a) -> tuple[Tensor, Tensor]:
    from torch.library import wrap_triton

    from bitcompile.kernels.weight_pack import quantize_pack

    return quantize_pack(a.w, a.scheme, a.per_channel, wrap=wrap_triton)


def weights_kblocked_traced(a) -> tuple[Tensor, Tensor, Tensor]:
    from torch.library import wrap_triton

    from bitcompile.kernels.weight_pack import quantize_pack_both

    return quantize_pack_both(a.w, a.scheme, a.per_channel, wrap=wrap_triton)


@functools.cache
def twin_quantize_weights():
    """``bitnet::quantize_weights_triton``: QAT graphs' per-step weight quantization through the
    weight-pack kernels, launched from Inductor's code (only where ``weights_kernel_supports``)."""
    op = twin("bitnet::quantize_weights_triton", quantize_weights, weights_traced)
    op.register_autograd(no_gradient, setup_context=quantizer_setup)
    return torch.ops.bitnet.quantize_weights_triton.default


@functools.cache
def twin_quantize_weights_kblocked():
    """``bitnet::quantize_weights_kblocked_triton``: the QAT weight quantization whose codes feed
    lowered linears only, both layouts from one pack-kernel launch from Inductor's code."""
    op = twin("bitnet::quantize_weights_kblocked_triton", quantize_weights_kblocked, weights_kblocked_traced)
    op.register_autograd(no_gradient, setup_context=quantizer_setup)
    return torch.ops.bitnet.quantize_weights_kblocked_triton.default
