"""Inference graphs: SwiGLU's product and the quantization of the projection it feeds -> one op.

A Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. After the sibling fusion gate and up
are one matmul whose output ``y = [gate | up]`` is split by two ``narrow`` views; the product
``silu(gate) * up`` is then written by one kernel and read back by the down projection's
activation quantizer. ``bitnet::gated_quant(y)`` computes the product per row in registers and
writes only its int8 codes and scales: one launch and one round trip of the product fewer per
layer. Matched only when the product and the ``silu`` have no other users.

Off unless ``BITCOMPILE_GATED_QUANT=1``: measured on an H100 (BENCHMARKS.md, round 31) the fused
kernel is slower than Inductor's silu·mul plus the plain quantizer at decode (one program per row
does all of a 14336-wide row's exp and divisions) and at a 2048-token prefill.
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta


def enabled() -> bool:
    """``BITCOMPILE_GATED_QUANT=1`` turns the fusion on (off by default: see the module docstring)."""
    return os.environ.get("BITCOMPILE_GATED_QUANT", "0") == "1"


def fuse_gated_quant(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for quant in list(graph.find_nodes(op="call_function", target=torch.ops.bitnet.quantize_activations.default)):
        product, bits = quant.args
        match = _swiglu(product)
        if match is None:
            continue
        fused, internal = match
        with graph.inserting_before(quant):
            gated = graph.call_function(torch.ops.bitnet.gated_quant.default, (fused, bits))
        gated.meta.update(quant.meta)
        quant.replace_all_uses_with(gated)
        graph.erase_node(quant)
        for node in internal:  # product, silu, then the halves where nothing else reads them
            if not node.users:
                graph.erase_node(node)
        _note(gated)


def _swiglu(product: fx.Node):
    """``(y, [product, silu, gate half, up half])`` if ``product = silu(y[..., :n]) * y[..., n:]``
    with ``y`` 2n wide, the product and the silu read by nothing else; else None."""
    if not (isinstance(product, fx.Node) and product.target is T.MUL and len(product.users) == 1):
        return None
    for act, up in (product.args, product.args[::-1]):
        if not (isinstance(act, fx.Node) and act.target is T.SILU and not act.kwargs and len(act.users) == 1):
            continue
        gate = act.args[0]
        halves = [_half(gate), _half(up)]
        if None in halves or halves[0][0] is not halves[1][0]:
            continue
        y, start_gate, _ = halves[0]
        _, start_up, width = halves[1]
        ym, pm = meta(y), meta(product)
        if ym is None or pm is None or pm.dtype != ym.dtype or pm.shape != (*ym.shape[:-1], width):
            continue
        if start_gate == 0 and start_up == width and ym.shape[-1] == 2 * width:
            return y, [product, act, gate, up]
    return None


def _half(node):
    """``(y, start, width)`` of ``torch.narrow(y, -1, start, width)`` (the sibling fusion's split)."""
    if not (isinstance(node, fx.Node) and node.target is torch.narrow and not node.kwargs):
        return None
    y, dim, start, width = node.args
    ym = meta(y)
    if ym is None or dim not in (-1, ym.dim() - 1) or not all(isinstance(v, int) for v in (start, width)):
        return None
    return y, start, width


def _note(gated: fx.Node) -> None:
    for user in gated.users:  # getitem(codes), getitem(scale) -> the down projection
        for linear in user.users:
            candidate = linear.meta.get("bitnet_candidate")
            if candidate is not None and "silu(gate) * up" not in candidate.reason:
                candidate.reason += ", input: silu(gate) * up quantized in one kernel"
