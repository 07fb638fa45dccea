"""One QAT layer's training step in every variant the benchmarks compare (timed by ``bench_kernels.py``,
profiled by ``profile_qat.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
from bitcompile.backend import cpp_wrapper_patches

from timing import DEVICE

ops = torch.ops.bitnet


def eager_bitlinear(x, w):
    """The usual BitNet b1.58 layer as people write it (fake-quant + F.linear, STE via detach)."""
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = x + ((x * s).round().clamp(-128, 127) / s - x).detach()
    sw = 1.0 / w.abs().mean().clamp(min=1e-5)
    wq = w + ((w * sw).round().clamp(-1, 1) / sw - w).detach()
    return F.linear(xq, wq)


def bitnet_ops_layer(x, w):
    xq, xs = ops.quantize_activations(x, 8)
    wq, ws = ops.quantize_weights(w, "ternary", False)
    return ops.lowbit_linear(x, w, None, xq, xs, wq, ws)


def qat_steps(m: int, n: int, k: int) -> dict:
    """One QAT layer forward + backward at ``m`` tokens, bf16: ``inductor`` (the usual
    fake-quant formula under ``torch.compile``), ``ours`` (the bitnet ops called eagerly),
    ``compiled`` (the product: a plain ``nn.Linear`` made a QAT layer by the bitnet backend,
    same quantizers, its ops called from AOTAutograd's compiled graphs) and ``compiled_q8``
    (the same with ``grad_input_bits=8``: int8 output gradients for the input gradient);
    ``graphs`` / ``graphs_q8`` / ``inductor_graphs``: ``compiled`` / ``compiled_q8`` /
    ``inductor`` with ``mode="reduce-overhead"`` (CUDA graphs: the host's launch cost leaves
    the step, so these hold on a slow or busy host); ``cpp`` / ``cpp_q8`` / ``inductor_cpp``:
    the same launched by Inductor's C++ wrapper (``cpp_wrapper``: less host time per step).
    Also ``pack``: the weight absmean + pack alone."""
    # The compiled nn.Modules share one frame (Dynamo's module wrapper), so each variant is
    # a cache entry of that frame: start empty, or a second shape passes the recompile limit.
    torch._dynamo.reset()
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    linear = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    compiled = torch.compile(linear, backend="bitnet")
    compiled_q8 = torch.compile(linear, backend="bitnet", options={"grad_input_bits": 8})
    graphs = torch.compile(linear, backend="bitnet", options={"mode": "reduce-overhead"})
    graphs_q8 = torch.compile(linear, backend="bitnet", options={"mode": "reduce-overhead", "grad_input_bits": 8})
    inductor_graphs = torch.compile(eager_bitlinear, mode="reduce-overhead")
    cpp = torch.compile(linear, backend="bitnet", options={"cpp_wrapper": True})
    cpp_q8 = torch.compile(linear, backend="bitnet", options={"cpp_wrapper": True, "grad_input_bits": 8})
    steps = {}
    for name, fn in (
        ("inductor", torch.compile(eager_bitlinear)),
        ("ours", bitnet_ops_layer),
        ("compiled", lambda x, w: compiled(x)),
        ("compiled_q8", lambda x, w: compiled_q8(x)),
        ("graphs", lambda x, w: graphs(x)),
        ("graphs_q8", lambda x, w: graphs_q8(x)),
        ("inductor_graphs", inductor_graphs),
        ("cpp", lambda x, w: cpp(x)),
        ("cpp_q8", lambda x, w: cpp_q8(x)),
        ("inductor_cpp", torch.compile(eager_bitlinear, options=cpp_wrapper_patches())),
    ):

        def step(fn=fn, graphed=name.endswith("graphs")):
            x.grad = w.grad = linear.weight.grad = None
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            fn(x, w).backward(g)

        steps[name] = step
    steps["pack"] = lambda: ops.quantize_weights(w.detach(), "ternary", False)
    return steps
