"""``linear_q``: an inference linear from already-quantized activations with a fused epilogue.

Emitted by ``passes/epilogue.py``: ``act(acc * s_w * s_x + bias) (+ residual)`` computed in
float32 and cast once to the output dtype, so the activation and the residual add cost no
extra pass over the output; by ``passes/swiglu.py`` with ``activation="swiglu"`` over a fused
gate+up matmul whose rows alternate gate, up (half the rows wide: ``silu(gate) * up``). No
gradients: training graphs keep ``lowbit_linear``.

Compiled graphs on CUDA take the packed weights in the kernels' K-blocked layout (relaid once
by the weight cache) through one of two ops (``passes/lower_triton.py``):
``linear_q_triton``, whose kernel Inductor launches from its own code, and, under CUDA graphs,
where a replay runs no Python, ``linear_q_kblocked``, an opaque call that launches whichever
kernel tuning picks, the Gluon tensor-core kernel for 2-64 rows included (Inductor's code
launches Triton kernels only).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import from_kblocked
from bitcompile.ops.common import bitnet_op, packed_ternary, require_static, twin, variant


@bitnet_op("bitnet::linear_q")
def linear_q(
    xq: Tensor,
    x_scale: Tensor,
    wq: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    k: int,
    dtype: torch.dtype,
    activation: str,
    residual: Optional[Tensor],
) -> Tensor:
    """Inference linear from int8 activations with the fused epilogue
    ``act(acc * s_w * s_x + bias) (+ residual)`` cast to ``dtype``."""
    return ref.linear_epilogue(xq, x_scale, wq, w_scale, bias, k, dtype, activation, residual)


@linear_q.register_fake
def _fake(*args):
    a = linear_q.Args(*args)
    width = a.wq.shape[0] // 2 if a.activation == "swiglu" else a.wq.shape[0]
    return a.xq.new_empty((*a.xq.shape[:-1], width), dtype=a.dtype)


def kernel_supports(wq: Tensor) -> bool:
    """The matmul kernel reads 2-bit packed weights (int8 weights run the reference)."""
    return packed_ternary(wq)


def _kernel(a, layout: str = "canonical", wrap=None, keep: bool = True):
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    return ternary_matmul(
        a.xq,
        a.wq,
        a.k,
        a.x_scale,
        a.w_scale,
        a.bias,
        a.dtype,
        a.activation,
        a.residual,
        layout=layout,
        wrap=wrap,
        keep=keep,
    )


@linear_q.register_kernel("cuda")
def _(*args):
    a = linear_q.Args(*args)
    if not kernel_supports(a.wq):
        return linear_q.prototype(*a)
    return _kernel(a)


def traced(a):
    from torch.library import wrap_triton

    require_static(a.xq, "linear_q_triton")
    return _kernel(a, layout="kblocked", wrap=wrap_triton)


# ``linear_q`` on K-blocked packed weights (``numerics.packing.to_kblocked``)
linear_q_kblocked = variant(
    "bitnet::linear_q_kblocked", linear_q, lambda a: linear_q.prototype(*a._replace(wq=from_kblocked(a.wq, a.k)))
)
linear_q_kblocked.register_fake(_fake)


@linear_q_kblocked.register_kernel("cuda")
def _(*args):
    # keep=False: nothing allocated here outlives the call (a CUDA graph records this launch)
    return _kernel(linear_q_kblocked.Args(*args), layout="kblocked", keep=False)


def make_device_constants(device: torch.device) -> None:
    """Allocate what the matmul kernels keep on the device between calls (the Gluon kernel's prmt
    tables, the split-K arrival counters) now, at compile time: allocated during a CUDA graph's
    warm-up run, it would live in the graph's memory pool, which CUDA graph trees refuse (a live
    tensor they do not track)."""
    from bitcompile.kernels import ternary_matmul, wgmma_matmul

    ternary_matmul.make_split_k_counters(device)
    if wgmma_matmul.available():
        wgmma_matmul.prmt_tables(device)


@functools.cache
def twin_linear_q():
    """``bitnet::linear_q_triton``: the matmul kernel launched from Inductor's code (compiled
    graphs on CUDA with static shapes, not under CUDA graphs); its packed weights arrive in the
    kernels' K-blocked layout (``numerics.packing.to_kblocked``), relaid once by the weight cache."""
    twin("bitnet::linear_q_triton", linear_q, traced, cpu=lambda a: linear_q_kblocked(*a))
    return torch.ops.bitnet.linear_q_triton.default
