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

from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import swiglu_product


def enabled() -> bool:
    """``BITCOMPILE_GATED_QUANT=1`` turns the fusion on (off by default: see the module docstring)."""
    return os.environ.get("BITCOMPILE_GATED_QUANT", "0") == "1"


def fuse_gated_quant(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for quant in list(graph.find_nodes(op="call_function", target=torch.ops.bitnet.quantize_activations.default)):
        product, bits = quant.args
        match = swiglu_product(product)
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


def _note(gated: fx.Node) -> None:
    for user in gated.users:  # getitem(codes), getitem(scale) -> the down projection
        for linear in user.users:
            candidate = linear.meta.get("bitnet_candidate")
            if candidate is not None and "silu(gate) * up" not in candidate.reason:
                candidate.reason += ", input: silu(gate) * up quantized in one kernel"
