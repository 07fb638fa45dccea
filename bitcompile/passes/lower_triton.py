"""Compiled graphs on CUDA launch our kernels without a Python call per op where they can.

* Without CUDA graphs the bitnet ops become their Inductor-visible Triton twins (the ops'
  ``twin_*()``), so Inductor launches the kernels from its generated code instead of calling an
  opaque op through Python (~100 us of host time per call):
  ``norm_quant`` and ``quantize_activations`` -> ``norm_quant_triton``, ``gated_quant`` ->
  ``gated_quant_triton``; in inference,
  ``linear_q`` -> ``linear_q_triton``; in training (QAT), ``quantize_weights`` ->
  ``quantize_weights_triton`` (a scheme of the weight-pack kernel, 2-D weights),
  ``lowbit_linear`` -> ``lowbit_linear_triton`` (int8 activations, packed ternary weights),
  whose twins keep their originals' autograd rules, so the backward graph launches the
  input-gradient kernels from Inductor's code too.
* Inference under CUDA graphs (``mode="reduce-overhead"``), where a replay runs no Python: the
  activation quantizers stay opaque ops and ``linear_q`` becomes ``linear_q_kblocked``, an opaque
  call on the weights in the kernels' layout. Both launch what an eager call launches (the Gluon
  matmul for 2-64 rows included, which Inductor's code cannot launch), and Inductor compiles a
  graph of extern calls instead of tracing every kernel launch (compile time).

A linear is lowered when its packed weights are a hoisted ternary weight (the weight cache then
serves them in the K-blocked layout) and every user of that weight is lowered. Only where the
choice of kernel can be made at compile time: the graph runs on CUDA and every shape the
kernels see is static (the variant and its tuned launch configuration depend on the row count;
with symbolic shapes the opaque ops choose at run time).

The report shows each lowered linear (``lowered: triton``, or ``lowered: opaque call`` under
CUDA graphs).
"""

from __future__ import annotations

import operator
import os
from collections import defaultdict

import torch
import torch.fx as fx

from bitcompile.config import CUDA_GRAPH_MODES
from bitcompile.ops import epilogue, linear, norm_quant, quantize
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta


def _static_cuda(*nodes) -> bool:
    """All these nodes' recorded tensors are on CUDA with static shapes (None args ignored)."""
    tensors = [meta(n) for n in nodes if isinstance(n, fx.Node)]
    return bool(tensors) and all(
        t is not None and t.device.type == "cuda" and all(isinstance(d, int) for d in t.shape) for t in tensors
    )


def lower_to_triton(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    if not any(_static_cuda(n) for n in graph.nodes if n.op == "placeholder"):
        return
    graphed = not ctx.training and ctx.config.mode in CUDA_GRAPH_MODES
    if not graphed:
        _lower_activation_quantization(graph)
    if ctx.training:
        _lower_qat_linears(graph)
    else:
        _lower_inference_linears(graph, ctx, graphed)


def _lower_activation_quantization(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target is torch.ops.bitnet.norm_quant.default and _static_cuda(node.args[0], node.args[1]):
            if norm_quant.kernel_supports(meta(node.args[0])):
                node.target = norm_quant.twin_norm_quant()
        elif node.target is torch.ops.bitnet.gated_quant.default and _static_cuda(node.args[0]):
            if norm_quant.gated_kernel_supports(meta(node.args[0])):
                node.target = norm_quant.twin_gated_quant()
        elif node.target is torch.ops.bitnet.quantize_activations.default and _static_cuda(node.args[0]):
            x, bits = node.args
            xm = meta(x)
            if norm_quant.kernel_supports(xm):  # plain quantization: the "none" norm
                node.target = norm_quant.twin_norm_quant()
                node.args = (x, None, None, None, "none", 0.0, bits, xm.dtype, False, False)


def _lower_qat_linears(graph: fx.Graph) -> None:
    """Training: the per-step weight quantizers and the linears on packed ternary weights and
    int8 activations (their STE backward then launches the input-gradient kernels from
    Inductor's code as well). A quantizer whose codes feed lowered linears only writes them in
    the matmul kernels' layout too, in the same launch (``quantize_weights_kblocked``): the
    forward matmul then needs no relayout launch of its own."""
    for node in list(graph.nodes):
        if node.target is torch.ops.bitnet.quantize_weights.default:
            w, scheme = node.args[:2]
            wm = meta(w)
            if wm is not None and quantize.weights_kernel_supports(wm, scheme) and _static_cuda(w):
                node.target = quantize.twin_quantize_weights()
        elif node.target is torch.ops.bitnet.lowbit_linear.default:
            x, xq, wq = node.args[0], node.args[3], node.args[5]
            if xq is None or not _packed_codes(wq) or not _static_cuda(node, x):
                continue
            node.target = linear.twin_lowbit_linear()
            _note_lowered(node, "triton")
    lowered = linear.twin_lowbit_linear()
    for node in graph.find_nodes(op="call_function", target=quantize.twin_quantize_weights()):
        codes = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        users = [u for c in codes for u in c.users]
        if not linear.kernel_supports_scheme(node.args[1]) or not users:
            continue
        if not all(u.target is lowered and u.args[5] in codes for u in users):
            continue
        node.target = quantize.twin_quantize_weights_kblocked()
        with graph.inserting_after(node):
            blocked = graph.call_function(operator.getitem, (node, 2))
        for user in users:  # (a keyword: grad_input_bits may be one, before it in the schema)
            user.kwargs = {**user.kwargs, "wq_kblocked": blocked}
    if group_weight_pack():
        _group_weight_quantizers(graph)


def group_weight_pack() -> bool:
    """``BITCOMPILE_GROUP_WEIGHT_PACK=1``: a training graph's weight quantizers run as one grouped
    call (``_group_weight_quantizers``). Off by default until measured on a GPU."""
    return os.environ.get("BITCOMPILE_GROUP_WEIGHT_PACK", "0") == "1"


def _group_weight_quantizers(graph: fx.Graph) -> None:
    """The K-blocked weight quantizers of a training graph whose weights are graph inputs become one
    ``quantize_weights_group`` call per (scheme, granularity, weight dtype, device), placed after the
    inputs: the step's whole weight side in two launches (``kernels.weight_pack_group``) instead of
    two per linear, an opaque call (its kernels take a table of addresses, which traced launches
    cannot build)."""
    groups = defaultdict(list)
    for node in graph.find_nodes(op="call_function", target=quantize.twin_quantize_weights_kblocked()):
        w, scheme, per_channel = node.args
        wm = meta(w)
        if w.op == "placeholder" and wm is not None:
            groups[(scheme, per_channel, wm.dtype, wm.device)].append(node)
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    for (scheme, per_channel, _, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        with graph.inserting_after(last_input):
            group = graph.call_function(
                torch.ops.bitnet.quantize_weights_group.default, ([n.args[0] for n in nodes], scheme, per_channel)
            )
        for i, node in enumerate(nodes):
            for user in list(node.users):
                with graph.inserting_after(group):
                    part = graph.call_function(operator.getitem, (group, 3 * i + user.args[1]))
                part.meta.update(user.meta)
                user.replace_all_uses_with(part)
                graph.erase_node(user)
            graph.erase_node(node)


def _packed_codes(wq) -> bool:
    """``wq`` is the packed output of a ``quantize_weights`` node of a scheme the matmul kernels
    read (a custom quantizer's weights come from elsewhere)."""
    if not (isinstance(wq, fx.Node) and wq.target is operator.getitem and wq.args[1] == 0):
        return False
    src = wq.args[0]
    quantizers = (torch.ops.bitnet.quantize_weights.default, quantize.twin_quantize_weights())
    return isinstance(src, fx.Node) and src.target in quantizers and linear.kernel_supports_scheme(src.args[1])


def _lower_inference_linears(graph: fx.Graph, ctx: PassContext, graphed: bool) -> None:
    target = torch.ops.bitnet.linear_q_kblocked.default if graphed else epilogue.twin_linear_q()
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for hoisted in ctx.hoisted:
        packed = placeholders.get(hoisted.packed_name)
        if packed is None or hoisted.scheme != "ternary":  # the K-blocked layout holds trits only
            continue
        users = list(packed.users)
        lowerable = [
            u
            for u in users
            if u.target is torch.ops.bitnet.linear_q.default and u.args[2] is packed and _static_cuda(u)
        ]
        if not users or len(lowerable) != len(users):
            continue
        hoisted.layout = "kblocked"
        for user in lowerable:
            user.target = target
            _note_lowered(user, "opaque call" if graphed else "triton")
            if graphed:
                epilogue.make_device_constants(meta(user).device)


def _note_lowered(node: fx.Node, how: str) -> None:
    candidate = node.meta.get("bitnet_candidate")
    if candidate is not None:
        candidate.reason += f", lowered: {how}"
