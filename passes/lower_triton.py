"""CUDA inference graphs: the fused ops become their Inductor-visible Triton twins.

``linear_q`` -> ``linear_q_triton``, and ``norm_quant`` and ``quantize_activations`` ->
``norm_quant_triton`` (``bitcompile.ops.triton_ops``), so Inductor launches our kernels
from its generated code instead of calling an opaque op through Python on every call. Only where the
choice of kernel can be made at compile time:

* the graph runs on CUDA and every shape the kernels see is static (the variant and its
  tuned launch configuration depend on the row count; with symbolic shapes the opaque
  ops choose at run time);
* for ``linear_q``, the packed weights are a hoisted ternary weight (its cache then
  serves them in the K-blocked layout) and every user of that weight is lowered.

The report shows each lowered linear (``lowered: triton``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitcompile.passes import PassContext
from bitcompile.passes.graph import meta


def _static_cuda(*nodes) -> bool:
    """All these nodes' recorded tensors are on CUDA with static shapes (None args ignored)."""
    tensors = [meta(n) for n in nodes if isinstance(n, fx.Node)]
    return bool(tensors) and all(
        t is not None and t.device.type == "cuda" and all(isinstance(d, int) for d in t.shape) for t in tensors
    )


def lower_to_triton(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.training or not ctx.config.fuse:
        return
    graph = gm.graph
    if not any(_static_cuda(n) for n in graph.nodes if n.op == "placeholder"):
        return
    # Registered on first use: the module imports Triton and Inductor (slow to import).
    import bitcompile.ops.triton_ops  # noqa: F401
    from bitcompile.kernels.act_quant import MAX_ROW

    for node in list(graph.nodes):
        if node.target is torch.ops.bitnet.norm_quant.default and _static_cuda(node.args[0], node.args[1]):
            if meta(node.args[0]).shape[-1] <= MAX_ROW:
                node.target = torch.ops.bitnet.norm_quant_triton.default
        elif node.target is torch.ops.bitnet.quantize_activations.default and _static_cuda(node.args[0]):
            x, bits = node.args
            xm = meta(x)
            if xm.is_floating_point() and xm.shape[-1] <= MAX_ROW:  # plain quantization: the "none" norm
                node.target = torch.ops.bitnet.norm_quant_triton.default
                node.args = (x, None, None, None, "none", 0.0, bits, xm.dtype, False, False)

    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for hoisted in ctx.hoisted:
        packed = placeholders.get(hoisted.packed_name)
        if packed is None or hoisted.scheme != "ternary":
            continue
        users = list(packed.users)
        lowerable = [
            u for u in users
            if u.target is torch.ops.bitnet.linear_q.default and u.args[2] is packed and _static_cuda(u)
        ]
        if not users or len(lowerable) != len(users):
            continue
        hoisted.layout = "kblocked"
        for user in lowerable:
            user.target = torch.ops.bitnet.linear_q_triton.default
            candidate = user.meta.get("bitnet_candidate")
            if candidate is not None:
                candidate.reason += ", lowered: triton"
