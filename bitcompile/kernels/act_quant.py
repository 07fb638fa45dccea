"""Per-token activation quantization, optionally fused behind (residual add +) a norm.

One program per token row holds the whole row in registers, so x is read once:
  x = silu(x[:K]) * x[K:]               if GATED (a fused gate+up output: SwiGLU), in x's dtype
  h = x (+ residual)                    stored only if STORE_H (the new residual stream)
  y = norm(h) * weight (+ bias)         stored only if STORE_Y (another consumer needs it)
  s = max(max|y|, qeps) / qmax, q = round(y / s) clipped     -> int8 q, fp32 s
NORM: 0 none, 1 RMSNorm with the cast to the input dtype before the weight multiply
(transformers' Llama/Mistral/Qwen spelling and torch's composite rms_norm), 2 RMSNorm
all in fp32, 3 LayerNorm (fp32, one cast at the end, as F.layer_norm).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from bitcompile.kernels import tuning
from bitcompile.kernels.common import round_to_int, rows
from bitcompile.numerics.spec import EPS
from bitcompile.numerics.spec import NORM_KINDS as _NORMS

NORM_KINDS = {name: code for code, name in enumerate(_NORMS)}  # the kernel's NORM codes
MAX_ROW = 65536  # one row in registers; longer rows use the reference


@triton.jit
def _norm_quant_kernel(
    X,
    RES,
    W,
    B,
    Q,
    S,
    Y,
    H,
    K,
    stride_x,
    stride_r,
    stride_q,
    stride_y,
    stride_h,
    eps,
    qmax,
    QEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_Y: tl.constexpr,
    STORE_H: tl.constexpr,
    USE_ASM: tl.constexpr,
    GATED: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    if PDL:  # (tuning.pdl) wait for the kernel before, then let the matmul behind start loading
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    # Float scalars arrive as fp32 from Triton's launcher but as fp64 from Inductor's (triton_op).
    eps = tl.cast(eps, tl.float32)
    qmax = tl.cast(qmax, tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if GATED:  # silu rounded to x's dtype, then the product rounded: eager's two ops
        # (silu's division is Triton's approximate one, 2 ulps of float32: it moves the bf16/fp16
        # silu only where the quotient lies that close to a rounding boundary; an IEEE division
        # here costs a quarter of the kernel's instructions.)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
        up = tl.load(X + row * stride_x + K + cols, mask=mask, other=0.0).to(tl.float32)
        x = (act * up).to(X.dtype.element_ty)
    if HAS_RES:
        # The add happens in the input dtype, as `x + residual` does in the graph.
        x = (x.to(tl.float32) + tl.load(RES + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(
            X.dtype.element_ty
        )
        if STORE_H:
            tl.store(H + row * stride_h + cols, x, mask=mask)
    h = x.to(tl.float32)
    if NORM == 0:
        y = h
        if HAS_W:  # a plain per-column scale (the QAT gradient path folds per-channel s_w in here)
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        if NORM == 3:
            mean = tl.math.div_rn(tl.sum(h, axis=0), K * 1.0)
            h = tl.where(mask, h - mean, 0.0)
        var = tl.math.div_rn(tl.sum(h * h, axis=0), K * 1.0)
        y = h * tl.rsqrt(var + eps)  # rsqrt, as the reference (and torch on CUDA)
        if NORM == 1:
            y = y.to(X.dtype.element_ty).to(tl.float32)
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        # The normalized tensor the graph would have produced, in its dtype.
        y = y.to(Y.dtype.element_ty)
        if STORE_Y:
            tl.store(Y + row * stride_y + cols, y, mask=mask)
        y = y.to(tl.float32)
    # Lanes past K hold exact zeros (every load above defaults to 0). The max propagates NaN,
    # so a NaN row gets a NaN scale, as in the reference, and its integers become 0.
    amax = tl.reduce(tl.abs(y), 0, _max_propagating_nan)
    # IEEE divisions (Triton's `/` may be approximate): the reference's integers exactly.
    scale = tl.math.div_rn(tl.maximum(amax, QEPS, propagate_nan=tl.PropagateNan.ALL), qmax)
    q = round_to_int(tl.math.div_rn(y, scale), -qmax.to(tl.int32) - 1, qmax.to(tl.int32), USE_ASM)
    tl.store(Q + row * stride_q + cols, q.to(tl.int8), mask=mask)
    tl.store(S + row, scale)


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def num_warps(block: int) -> int:
    """Warps per row program: one per 1024 elements for 4096- and 8192-wide rows (the fastest on
    the H100 in ``benchmarks/sweep_norm_quant.py``; docs/kernels.md); other widths, not swept,
    one per 512."""
    return min(16, max(1, block // (1024 if block in (4096, 8192) else 512)))


def gated_num_warps(block: int) -> int:
    """Warps per row program of the SwiGLU prologue, which computes an exp and a division per
    element: one per 512 of the product's elements, up to 32 (at 14336-wide products 32 warps
    beat 16 at one row and at 2048 in ``sweep_norm_quant.py --gated``: 8.6 against 9.2 µs, 70
    against 77 µs; BENCHMARKS.md round 32)."""
    return min(32, max(1, block // 512))


def norm_quant(
    x: torch.Tensor,
    bits: int = 8,
    kind: str = "none",
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    norm_dtype: Optional[torch.dtype] = None,
    store_normed: bool = False,
    store_sum: bool = False,
    wrap: Optional[Callable] = None,
    qeps: float = EPS,
    gated: bool = False,
):
    """Returns ``(q int8 [..., K], scale fp32 [..., 1], normed | None, h | None)``.

    ``gated``: ``x`` is ``[..., 2K]``, a gate and an up projection side by side, and the row
    quantized is ``silu(gate) * up`` (``reference.gated_quantize``; the "none" norm only).

    ``normed`` (dtype ``norm_dtype``, default x.dtype) is written only with ``store_normed``;
    ``h = x + residual`` only with ``store_sum``. ``wrap=torch.library.wrap_triton``
    launches through it (traceable; the ops' Inductor-visible twins). ``max|y|`` is clamped at ``qeps``;
    with ``kind="none"``, ``weight`` is a per-column fp32 multiplier."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; supported: {', '.join(NORM_KINDS)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    if gated and (kind != "none" or residual is not None or weight is not None or store_normed or store_sum):
        raise ValueError("the gated prologue takes the plain quantization only (no norm, residual or stores)")
    if gated and x.shape[-1] % 2:
        raise ValueError(f"a gated row holds gate and up halves: even width needed, got {x.shape[-1]}")
    k = x.shape[-1] // 2 if gated else x.shape[-1]
    if k > MAX_ROW:
        raise ValueError(f"rows longer than {MAX_ROW} are not supported by the fused kernel (got {k})")
    lead = x.shape[:-1]
    x2 = rows(x, x.shape[-1])
    m = x2.shape[0]
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    y = torch.empty((m, k) if store_normed else (1, 1), device=x.device, dtype=norm_dtype or x.dtype)
    h = torch.empty((m, k) if store_sum else (1, 1), device=x.device, dtype=x.dtype)
    r2 = residual.reshape(-1, k).contiguous() if residual is not None else x2
    if m:
        block = triton.next_power_of_2(max(k, 16))
        flags = dict(
            BLOCK=block,
            NORM=NORM_KINDS[kind],
            HAS_RES=residual is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            STORE_Y=store_normed,
            STORE_H=store_sum,
            USE_ASM=not tuning.interpreting(),
            GATED=gated,
        )
        warps = 1 if tuning.interpreting() else (gated_num_warps if gated else num_warps)(block)
        pdl = wrap is None and tuning.pdl(x.device)
        if pdl:
            flags.update(PDL=True, launch_pdl=True)
        compiled = tuning.traceable(_norm_quant_kernel, wrap)[(m,)](
            x2,
            r2,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            q,
            s,
            y,
            h,
            k,
            x2.stride(0),
            r2.stride(0),
            q.stride(0),
            y.stride(0),
            h.stride(0),
            eps,
            float(2 ** (bits - 1) - 1),
            qeps,
            num_warps=warps,
            **flags,
        )
        tuning.dump_source(_norm_quant_kernel, compiled, {**flags, "x": str(x.dtype), "normed": str(y.dtype)})
    return (
        q.reshape(*lead, k),
        s.reshape(*lead, 1),
        y.reshape(*lead, k) if store_normed else None,
        h.reshape(*lead, k) if store_sum else None,
    )
