"""Plain-torch reference implementations: the oracle every kernel is tested against.

The semantics are ``spec``'s (BitNet b1.58). Scales are always float32. NaN in an input
propagates to the output through its scale. The matmuls here run with autocast off: an
integer accumulator is exact, and the STE gradients are in the gradient's dtype, whatever
autocast region the op is called in (a quantized linear's activations follow autocast
through ``autocast_input``, before they are quantized).
"""

from __future__ import annotations

import functools

import torch

from bitcompile.numerics.packing import pack_ternary, unpack_ternary
from bitcompile.numerics.spec import ACTIVATIONS, EPS, GRAD_EPS, NORM_KINDS, WEIGHT_SCHEMES, check_bits, qmax

# float32 matmul of integers is exact while every partial sum stays below 2**24.
_EXACT_F32_LIMIT = 2**24


def quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax: ``x [..., K] -> (q int8 [..., K], scale float32 [..., 1])``; ``max|x|``
    is clamped at ``eps``."""
    q, scale = _absmax_quantize(x.float(), (-1,), bits, eps)
    # Contiguous like the fake kernel, also for a transposed x (else compiled graphs fail
    # their stride assertion on this op).
    return q.contiguous(), scale.contiguous()


def _abs_reduce(a: torch.Tensor, op: str, dims=None, keepdim: bool = False) -> torch.Tensor:
    """``a.amax`` / ``a.mean`` over ``dims`` (all dims if None) of ``a >= 0``, 0 where the reduced
    set is empty (amax raises there, mean gives NaN): an empty row scales like an all-zero one."""
    if dims is None:
        return getattr(a, op)() if a.numel() else a.sum()
    if any(a.shape[d] == 0 for d in dims):
        return a.sum(dim=dims, keepdim=keepdim)
    return getattr(a, op)(dim=dims, keepdim=keepdim)


def _absmax_quantize(xf: torch.Tensor, dims: tuple, bits: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``q`` and float32 ``scale`` with one absmax over ``dims`` (element-wise otherwise,
    so ``q`` keeps ``xf``'s memory layout)."""
    amax = _abs_reduce(xf.abs(), "amax", dims, keepdim=True).clamp(min=eps)
    # Divide by a tensor, not a Python number: on CUDA `t / 127` computes t * fl(1/127),
    # one ulp off the IEEE quotient the CPU (and the Triton kernel) compute for ~1/4 of rows.
    scale = amax / amax.new_full((), float(qmax(bits)))
    q = (xf / scale).round().clamp(-qmax(bits) - 1, qmax(bits))
    # NaN rows: keep the integers defined (0); the NaN scale carries the NaN to the output.
    return torch.nan_to_num(q, nan=0.0).to(torch.int8), scale


def weight_scale(w: torch.Tensor, scheme: str, per_channel: bool) -> torch.Tensor:
    """float32 scale: ``[N]`` per output channel or ``[1]`` per tensor."""
    a = w.float().abs()
    dims = (-1,) if per_channel else None
    if scheme == "int8":
        s = _abs_reduce(a, "amax", dims).reshape(-1) / 127
    else:  # ternary (absmean, BitNet b1.58) and binary (alpha = mean|W|, XNOR-Net)
        s = _abs_reduce(a, "mean", dims).reshape(-1)
    return s.clamp(min=EPS)


def weight_integers(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """The integer weights as int8 ``[N, K]`` (trits, signs or int8)."""
    s = scale.reshape(-1, 1) if scale.numel() != 1 else scale  # per channel, also with no channels
    wf = w.float()
    if scheme == "ternary":
        v = (wf / s).round().clamp(-1, 1)
    elif scheme == "binary":
        v = torch.where(wf >= 0, 1.0, -1.0)
    elif scheme == "int8":
        v = (wf / s).round().clamp(-127, 127)
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}; supported: {', '.join(WEIGHT_SCHEMES)}")
    return torch.nan_to_num(v, nan=0.0).to(torch.int8)


def quantize_weights(w: torch.Tensor, scheme: str = "ternary", per_channel: bool = False):
    """``W [N, K] -> (wq, scale)``: wq is packed uint8 ``[N, ceil(K/4)]`` for ternary and
    binary (canonical format), int8 ``[N, K]`` for int8."""
    scale = weight_scale(w, scheme, per_channel)
    ints = weight_integers(w, scale, scheme)
    return (ints if scheme == "int8" else pack_ternary(ints)), scale


def latent_weights(
    ints: torch.Tensor, scale: torch.Tensor, scheme: str, per_channel: bool, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A weight ``W`` that ``quantize_weights(W, scheme, per_channel)`` maps back to ``ints`` and
    ``scale`` (the inverse a trainable model needs after loading packed weights).

    ``W = ints * c`` with ``c ~ scale / f``, ``f`` the mean of ``|ints|`` (the non-zero fraction
    for ternary, 1 for binary) or ``max|ints| / 127`` for int8, so the re-derived scale is
    ``scale`` and the rounded codes are ``ints``. ``c`` is then searched among the nearby float32
    values for the one whose re-derived scale is nearest ``scale`` (the scale is monotone in
    ``c``), and where no ``c`` hits it (the float32 sum of equal magnitudes skips some values) a
    per-tensor scale is reached by raising one weight (``_raise_one_weight``). The codes come back
    exactly; the scale bitwise for float32 per-tensor weights, within a float32 ulp or two per
    channel, within the dtype's rounding for a coarser ``dtype`` (bfloat16)."""
    rows = ints.float().reshape(ints.shape[0], -1)
    target = scale.float().reshape(-1, 1) if per_channel else scale.float().reshape(1, 1)
    if scheme == "int8":
        magnitude = rows.abs().amax(-1, keepdim=True) if per_channel else rows.abs().amax().reshape(1, 1)
        magnitude = magnitude / 127
    else:
        magnitude = rows.abs().mean(-1, keepdim=True) if per_channel else rows.abs().mean().reshape(1, 1)
    c = target / magnitude.clamp(min=torch.finfo(torch.float32).tiny)

    def rederived(c):
        return weight_scale((rows * c).to(dtype), scheme, per_channel).reshape(-1, 1)

    # Bisect over the float32 bit patterns around c (monotone in value for positive floats) for
    # the smallest c whose re-derived scale reaches the target.
    lo, hi = c.view(torch.int32) - _SEARCH_ULPS, c.view(torch.int32) + _SEARCH_ULPS
    for _ in range(_SEARCH_ULPS.bit_length() + 1):
        mid = lo + (hi - lo) // 2  # (lo + hi) overflows int32 for floats >= 2
        below = rederived(mid.view(torch.float32)) < target
        lo, hi = torch.where(below, mid + 1, lo), torch.where(below, hi, mid)
    # lo reaches the target or is the first value above it (where none hits it exactly, the
    # re-derived scale jumps over it): keep whichever of lo and its predecessor lands closer.
    above, below = lo.view(torch.float32), (lo - 1).view(torch.float32)
    closer = (rederived(above) - target).abs() <= (rederived(below) - target).abs()
    w = (rows * torch.where(closer, above, below)).to(dtype)
    if (
        not per_channel
        and dtype == torch.float32
        and not torch.equal(rederived_w := weight_scale(w, scheme, False).reshape(1, 1), target)
    ):
        w = _raise_one_weight(rows * below.reshape(1, 1), target, scheme, rederived_w)
    return w.reshape(ints.shape)


_SEARCH_ULPS = 64  # float32 steps searched on each side of the first estimate


def _raise_one_weight(w: torch.Tensor, target: torch.Tensor, scheme: str, fallback_scale) -> torch.Tensor:
    """A per-tensor scale that no common magnitude reaches: from weights whose scale lies just
    below it, raise one non-zero weight by the bisected amount that brings the float32 sum to it
    (the sum then moves by single ulps, except where the addition that takes in that weight's
    partial sum rounds a tie to even, so a few positions are tried). ``w`` unchanged where none
    works (the scale then within an ulp or two)."""
    flat = w.reshape(-1)
    nonzero = flat.nonzero().reshape(-1)
    if nonzero.numel() == 0:
        return w
    magnitude = float(flat[nonzero[0]].abs())
    top_bits = int(
        torch.tensor([magnitude + 64 * float(target) * flat.numel() * 2.0**-23 + magnitude * 2.0**-20]).view(
            torch.int32
        )
    )
    for position in nonzero[torch.linspace(0, nonzero.numel() - 1, min(8, nonzero.numel())).round().long()].tolist():
        sign = float(flat[position].sign())
        lo, hi = int(flat[position].abs().reshape(1).view(torch.int32)), top_bits
        while lo < hi:
            mid = lo + (hi - lo) // 2
            flat[position] = sign * torch.tensor([mid], dtype=torch.int32).view(torch.float32)[0]
            if bool(weight_scale(flat, scheme, False) < target):
                lo = mid + 1
            else:
                hi = mid
        flat[position] = sign * torch.tensor([lo], dtype=torch.int32).view(torch.float32)[0]
        if torch.equal(weight_scale(flat, scheme, False), target.reshape(1)):
            return flat.reshape(w.shape)
        flat[position] = sign * magnitude
    return w


def unpack_weights(wq: torch.Tensor, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Integer weights ``[N, K]`` from either stored form."""
    return wq.to(dtype) if wq.dtype == torch.int8 else unpack_ternary(wq, k, dtype)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype of its device when autocast is on (as ``nn.Linear`` and
    ``nn.Conv*d`` cast their inputs), else ``x``: a quantized layer's output dtype then follows
    autocast's rule for the layer it replaces."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _autocast_off(fn):
    """Run ``fn`` with autocast disabled on its first tensor argument's device."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


@_autocast_off
def lowbit_matmul(a: torch.Tensor, wq: torch.Tensor, k: int) -> torch.Tensor:
    """``a [..., K] @ W_int^T``. int8 ``a`` gives the exact int32 accumulator; a float
    ``a`` (weight-only) gives float32."""
    if a.dtype == torch.int8:
        # Exact in float32 while max|partial sum| <= 128 * 127 * K < 2**24; float64 beyond.
        acc_dtype = torch.float32 if 128 * 127 * k < _EXACT_F32_LIMIT else torch.float64
        out = a.to(acc_dtype) @ unpack_weights(wq, k, acc_dtype).t()
        return out.to(torch.int32)
    return a.float() @ unpack_weights(wq, k, torch.float32).t()


def dequantize(acc, x_scale, w_scale, bias, dtype: torch.dtype) -> torch.Tensor:
    """``acc * s_x * s_w + bias`` in float32, cast to ``dtype``."""
    y = acc.float() * w_scale
    if x_scale is not None:
        y = y * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def lowbit_linear(x, bias, xq, x_scale, wq, w_scale, k: int) -> torch.Tensor:
    """Forward of one quantized linear from its quantized operands; output dtype = x.dtype."""
    a = xq if xq is not None else x
    return dequantize(lowbit_matmul(a, wq, k), x_scale, w_scale, bias, x.dtype)


def dequantized_weight(wq, w_scale, k: int, dtype: torch.dtype) -> torch.Tensor:
    s = w_scale.reshape(-1, 1) if w_scale.numel() > 1 else w_scale
    return (unpack_weights(wq, k, torch.float32) * s).to(dtype)


@_autocast_off
def grad_input(grad, wq, w_scale, k: int, bits=None) -> torch.Tensor:
    """The STE input gradient ``grad @ (W_int * s_w)`` in grad's dtype, or with ``bits``, from
    ``grad`` quantized per row."""
    if bits is not None:
        return grad_input_quantized(grad, wq, w_scale, k, bits)
    return grad @ dequantized_weight(wq, w_scale, k, grad.dtype)


def grad_input_quantized(grad, wq, w_scale, k: int, bits: int) -> torch.Tensor:
    """Input gradient from an int ``bits`` output gradient (SwitchBack, Wortsman et al. 2023):
    ``g' = grad * s_w`` (per-channel s_w lies along the contraction, so it is folded in first;
    a per-tensor one is applied at the end), q and s_g the per-row absmax quantization of
    ``g'``, then ``(q @ W_int) * s_g (* s_w)``, q @ W_int exact in int32, the rest as ``dequantize``."""
    check_bits("grad_input_bits", bits, "exact STE input gradient")
    n = wq.shape[0]
    per_channel = w_scale.numel() > 1
    g = grad.reshape(-1, n)
    q, s = quantize_activations(g.float() * w_scale if per_channel else g, bits, GRAD_EPS)
    # W_int^T [K, N]: int8 weights as they are, trits packed along N
    w_t = wq.t().contiguous() if wq.dtype == torch.int8 else pack_ternary(unpack_weights(wq, k).t())
    out_scale = torch.ones_like(w_scale[:1]) if per_channel else w_scale
    return dequantize(lowbit_matmul(q, w_t, n), s, out_scale, None, grad.dtype).reshape(*grad.shape[:-1], k)


def dequantized_activations(xq, x_scale, dtype: torch.dtype) -> torch.Tensor:
    """``(xq.float() * x_scale).to(dtype)``: the fp32 product rounded once to ``dtype``."""
    if x_scale.requires_grad:  # a learned scale: out= records no autograd
        return (xq.float() * x_scale).to(dtype)
    # One pass (TensorIterator computes in fp32 and casts on store), not three: run eagerly on
    # the GPU, the spelled-out form also writes and reads the fp32 copy and the fp32 product,
    # ~6x the bytes (19 instead of 3 per element; compiled graphs fuse either form).
    return torch.mul(xq, x_scale, out=torch.empty(xq.shape, dtype=dtype, device=xq.device))


# --- convolution and attention matmuls ------------------------------------------


def quantize_activations_per_sample(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax over everything but the batch dim: ``x [N, C, *S] -> (int8 [N, C, *S], float32
    [N, 1, *1])``. A convolution sums over channels *and* kernel positions, so only a scale
    constant over both factors out of the integer accumulator; zero padding stays exactly 0.
    ``q`` is channels-last (channel stride 1: NHWC, NLC) whatever ``x``'s layout, as the conv
    kernel reads it."""
    q, scale = _absmax_quantize(x.float(), tuple(range(1, x.dim())), bits, EPS)
    return channels_last_empty(x, torch.int8).copy_(q), scale.contiguous()


def channels_last_empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``like``'s shape whose dim 1 (channels) has stride 1, the other dims
    in order after it: NHWC for 4-D, NLC for 3-D."""
    return like.new_empty((like.shape[0], *like.shape[2:], like.shape[1]), dtype=dtype).movedim(-1, 1)


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of the conv ops' outputs: channels-last for a channels-last 4-D ``x``, as
    ``nn.Conv2d`` keeps it; contiguous else. The fake kernel uses the same rule, so compiled
    graphs' stride checks hold."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_fn(spatial_dims: int):
    import torch.nn.functional as F

    if spatial_dims not in (1, 2):
        raise ValueError(f"lowbit conv supports conv1d and conv2d (3-D or 4-D input), got {spatial_dims} spatial dims")
    return F.conv1d if spatial_dims == 1 else F.conv2d


@_autocast_off
def lowbit_conv_accumulate(a, wq, weight_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """Convolution of ``a`` with the integer weights (``wq`` packs ``W.flatten(1)``). int8 ``a``
    gives the exact int32 accumulator (float64 sums of integers below 2**53 are exact in any
    order); a float ``a`` (weight-only) gives float32."""
    k = 1
    for d in weight_shape[1:]:
        k *= d
    conv = _conv_fn(a.dim() - 2)
    dtype = torch.float64 if a.dtype == torch.int8 else torch.float32
    w = unpack_weights(wq, k, dtype).reshape(weight_shape)
    out = conv(a.to(dtype), w, None, stride, padding, dilation, groups)
    return out.to(torch.int32) if a.dtype == torch.int8 else out


def per_channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``[C]`` (or ``[1]``) vector shaped to broadcast over dim 1 of an ``ndim`` tensor."""
    return scale.reshape(-1, *([1] * (ndim - 2)))


def lowbit_conv(x, weight_shape, bias, xq, x_scale, wq, w_scale, stride, padding, dilation, groups) -> torch.Tensor:
    """Forward of one quantized conv from its quantized operands; output dtype = x.dtype."""
    a = xq if xq is not None else x
    acc = lowbit_conv_accumulate(a, wq, weight_shape, stride, padding, dilation, groups)
    y = acc.float() * per_channel(w_scale, acc.dim())
    if x_scale is not None:
        y = y * x_scale
    if bias is not None:
        y = y + per_channel(bias.float(), acc.dim())
    return y.to(x.dtype).contiguous(memory_format=conv_memory_format(x))


def quantize_per_head(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax over the last two dims: ``x [*H, M, K] -> (int8, float32 [*H, 1, 1])``: one
    scale per (batch, head) matrix, which factors out of a matmul on either side."""
    xf = x.float()
    scale = _abs_reduce(xf.abs(), "amax", (-2, -1), keepdim=True).clamp(min=EPS) / qmax(bits)
    q = (xf / scale).round().clamp(-qmax(bits) - 1, qmax(bits))
    return torch.nan_to_num(q, nan=0.0).to(torch.int8), scale


@_autocast_off
def int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b`` of int8 batched matrices (float64 sums of integers are exact)."""
    return (a.double() @ b.double()).to(torch.int32)


def quantized_attention_matmul(a: torch.Tensor, b: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``Q(a) @ Q(b)`` with per-head absmax scales, in ``a``'s dtype (the broadcast of float
    ``a [*H, M, K] @ b [*H, K, N]`` with both operands fake-quantized)."""
    qa, sa = quantize_per_head(a, bits)
    qb, sb = quantize_per_head(b, bits)
    return (int_bmm(qa, qb).float() * sa * sb).to(a.dtype)


# --- fused forms: the norm + quantization and linear-epilogue ops -----------------


def normalize(h: torch.Tensor, kind: str, weight, bias, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The norm as the graph computes it. ``rms``: transformers' Llama/Mistral/Qwen
    RMSNorm (fp32 statistics, cast to the input dtype, then times weight);
    ``rms_fp32``: everything in fp32, one cast; ``layer``: ``F.layer_norm`` semantics."""
    hf = h.float()
    if kind == "none":
        return h.to(out_dtype)
    if kind == "layer":
        hf = hf - hf.mean(-1, keepdim=True)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms":
        y = y.to(h.dtype).float()
    elif kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; supported: {', '.join(NORM_KINDS)}")
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def normalize_backward(h: torch.Tensor, grad: torch.Tensor, kind: str, weight, bias, eps: float):
    """Gradients of :func:`normalize` for an output gradient ``grad``: ``(d h, d weight,
    d bias)`` in float32 (casts count as the identity; ``d weight`` uses the normalized
    value the forward multiplied, cast as there). None where there is nothing to return."""
    g = grad.float()
    if kind == "none":
        return g, None, None
    hf = h.float()
    if kind == "layer":
        hf = hf - hf.mean(-1, keepdim=True)
    r = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = hf * r
    lead = tuple(range(g.dim() - 1))
    gw = (g * (xhat.to(h.dtype).float() if kind == "rms" else xhat)).sum(lead) if weight is not None else None
    gb = g.sum(lead) if bias is not None else None
    if weight is not None:
        g = g * weight.float()
    if kind == "layer":
        g = g - g.mean(-1, keepdim=True)
    gh = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return gh, gw, gb


def norm_quant(x, residual, weight, bias, kind: str, eps: float, bits: int, norm_dtype: torch.dtype):
    """``h = x (+ residual)`` in x's dtype, ``y = normalize(h)``, ``(q, s) = quantize_activations(y)``.
    Returns ``(q, s, y, h)``."""
    h = x if residual is None else x + residual
    y = normalize(h, kind, weight, bias, eps, norm_dtype)
    q, s = quantize_activations(y, bits)
    return q, s, y, h


def gated_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = [gate | up]`` along the last dimension (a fused gate+up projection's output):
    ``quantize_activations(silu(gate) * up)``, the product in x's dtype as eager computes it
    (``silu`` rounded to x's dtype, then the product)."""
    gate, up = x.chunk(2, dim=-1)
    return quantize_activations(torch.nn.functional.silu(gate) * up, bits)


def activation(y: torch.Tensor, name: str) -> torch.Tensor:
    """The epilogue activations, on fp32."""
    if name == "none":
        return y
    if name == "relu":
        return torch.relu(y)
    if name == "gelu":
        return torch.nn.functional.gelu(y)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(y)
    if name == "relu2":
        return torch.relu(y).square()
    if name == "swiglu":  # even columns gate, odd columns up (interleave_rows)
        return torch.nn.functional.silu(y[..., 0::2]) * y[..., 1::2]
    raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows (or per-row scales) of two equal-shape tensors alternated: gate 0, up 0, gate 1, ...
    The weights of a matmul whose ``swiglu`` epilogue pairs each gate row with its up row."""
    if gate.shape != up.shape:
        raise ValueError(f"interleave_rows needs equal shapes, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return torch.stack((gate, up), 1).flatten(0, 1)


def linear_epilogue(xq, x_scale, wq, w_scale, bias, k: int, dtype: torch.dtype, act: str = "none", residual=None):
    """Quantized linear from int8 operands with the fused epilogue:
    ``act(acc * s_w * s_x + bias) (+ residual)`` in fp32, cast to ``dtype`` (``swiglu``: half
    the weight rows wide, the residual too)."""
    y = dequantize(lowbit_matmul(xq, wq, k), x_scale, w_scale, bias, torch.float32)
    y = activation(y, act)
    if residual is not None:
        y = y + residual.float()
    return y.to(dtype)
