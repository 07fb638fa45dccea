"""Inference graphs: SwiGLU's product computed in the epilogue of the fused gate+up matmul.

After the sibling fusion a Llama-style MLP's gate and up projections are one matmul whose output
``y = [gate | up]`` two ``narrow`` views split into ``silu(gate) * up``: y is written and read back
by a separate silu·mul kernel (at a 2048-token prefill of Llama-3-8B shapes, 117 MB written and
read again, 59 MB written, per layer). Here that matmul's weight rows alternate instead (gate 0,
up 0, gate 1, ...: the weight cache builds them once, ``reference.interleave_rows``), so every
tile holds whole (gate, up) row pairs, and its epilogue computes ``silu(gate) * up``
(``linear_q``'s ``activation="swiglu"``): the product is the matmul's only output. Matched for a
sibling group of exactly two linears whose halves feed nothing but the product (their biases,
if any, interleaved in the graph), except at 2-64 rows (``_gluon_rows``).

Off unless ``BITCOMPILE_SWIGLU=1``: its first form made an H100 prefill's matmuls slower
(BENCHMARKS.md round 35: the epilogue stored 2-byte scalars); the corrected epilogue has not
been timed on a GPU yet.
"""

from __future__ import annotations

import math
import os

import torch
import torch.fx as fx

from bitcompile.kernels.wgmma_matmul import MAX_M
from bitcompile.numerics.reference import interleave_rows
from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta, swiglu_product


def enabled() -> bool:
    """``BITCOMPILE_SWIGLU=1`` turns the fusion on (off by default: see the module docstring)."""
    return os.environ.get("BITCOMPILE_SWIGLU", "0") == "1"


def fuse_swiglu(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    hoisted = {h.packed_name: h for h in ctx.hoisted}
    for product in list(graph.find_nodes(op="call_function", target=T.MUL)):
        match = swiglu_product(product)
        if match is None:
            continue
        y, (_, silu, gate, up) = match
        if y.target is not torch.ops.bitnet.linear_q.default or y.args[7:] != ("none", None):
            continue
        xq, x_scale, packed, scale, bias, k, dtype = y.args[:7]
        group = hoisted.get(getattr(packed, "name", None))
        if group is None or len(group.members) != 2 or set(y.users) != {gate, up} or not _stacked(bias):
            continue
        if _gluon_rows(product):
            continue
        group.interleave = True  # equal halves: swiglu_product matched [0, n) and [n, 2n)
        with graph.inserting_before(product):
            if bias is not None:  # the sibling fusion's torch.cat of the two biases
                bias = graph.call_function(interleave_rows, tuple(bias.args[0]))
            fused = graph.call_function(
                torch.ops.bitnet.linear_q.default, (xq, x_scale, packed, scale, bias, k, dtype, "swiglu", None)
            )
        fused.meta.update(product.meta)
        product.replace_all_uses_with(fused)
        stacked_bias = y.args[4]
        for node in (product, silu, gate, up, y):
            graph.erase_node(node)
        if stacked_bias is not None and not stacked_bias.users:
            graph.erase_node(stacked_bias)
        for candidate in y.meta.get("bitnet_members", ()):
            candidate.reason += ", epilogue: silu(gate) * up (gate and up rows interleaved)"


def _stacked(bias) -> bool:
    """No bias, or the sibling fusion's ``torch.cat`` of two (whose rows are then interleaved)."""
    return bias is None or (bias.target is torch.cat and len(bias.args) == 1 and len(bias.args[0]) == 2)


def _gluon_rows(product: fx.Node) -> bool:
    """A static row count in the Gluon kernel's range (2-64), whose epilogue has no swiglu: the fused
    matmul would run on a Triton kernel there, which tuning ranks below the Gluon kernel at those
    rows on the H100 (the shipped table)."""
    m = meta(product)
    rows = math.prod(m.shape[:-1]) if m is not None else None
    return isinstance(rows, int) and 2 <= rows <= MAX_M
