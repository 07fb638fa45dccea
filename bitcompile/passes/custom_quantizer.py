"""Linears with a user-supplied weight quantizer (``options={"weight": quantizer}``).

Any object with ``quantize``/``dequantize``/``parameters`` (the weight-quantizer protocol,
``bitcompile.quant.WeightQuantizer``) can quantize the weights. The rewrite emits the
same computation as the eager ``bitcompile.quant.quantized_linear_with``:

    w_fq = dequantize(quantize(W))          the quantizer's own forward and gradient rule
    x_fq = fake-quantized activations       per-token absmax, STE (if activation_bits)
    y    = linear(x_fq, w_fq, b)            float matmul (codes are not packed: their
                                            format is the quantizer's business)

The quantizer's parameters (and buffers) are not model parameters, so Dynamo never
lifts them into the graph. They become extra placeholders, one per tensor, appended
to the graph's inputs; the backend's runtime wrapper feeds their current values at
every call (``PassContext.runtime_inputs``), so AOTAutograd returns their gradients
and the user's optimizer updates them like any parameter.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn.functional as F

from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta, owner
from bitcompile.quant.functional import fake_quantize_activations
from bitcompile.quant.quantizers import fake_quantize


def state_slots(quantizer) -> list[tuple[dict, str]]:
    """Where the quantizer keeps its tensors, as ``(dict, key)`` slots, in a fixed order:
    parameters and buffers of an ``nn.Module`` (and its submodules); for other objects,
    the attributes holding ``parameters()`` and then any other tensor attributes."""
    if isinstance(quantizer, torch.nn.Module):
        slots = []
        for module in quantizer.modules():
            slots += [(module._parameters, k) for k, v in module._parameters.items() if v is not None]
            slots += [(module._buffers, k) for k, v in module._buffers.items() if v is not None]
        return slots
    attrs = vars(quantizer)
    slots = []
    for i, p in enumerate(quantizer.parameters()):
        name = next((k for k, v in attrs.items() if v is p), None)
        if name is None:
            raise TypeError(
                f"parameter {i} of {type(quantizer).__name__} is not an attribute of it; make the quantizer "
                "an nn.Module or keep each parameter in an attribute so the compiled graph can feed it"
            )
        slots.append((attrs, name))
    named = {k for _, k in slots}
    slots += [(attrs, k) for k in sorted(attrs) if k not in named and isinstance(attrs[k], torch.Tensor)]
    return slots


def quantizer_tensors(quantizer) -> list[torch.Tensor]:
    """The tensors fed to the graph at every call (current values, updated in place or not)."""
    return [d[k] for d, k in state_slots(quantizer)]


@contextmanager
def bound_tensors(quantizer, tensors):
    """Temporarily put ``tensors`` (graph inputs) in the quantizer's tensor slots."""
    slots = state_slots(quantizer)
    saved = [d[k] for d, k in slots]
    try:
        for (d, k), t in zip(slots, tensors):
            d[k] = t
        yield
    finally:
        for (d, k), old in zip(slots, saved):
            d[k] = old


class QuantizerCall:
    """Graph target: ``(W, *quantizer params) -> fake-quantized W`` for one layer."""

    def __init__(self, quantizer, layer: str):
        self.quantizer, self.layer = quantizer, layer
        self.__name__ = f"{type(quantizer).__name__}_fake_quantize"

    def __call__(self, weight, *params):
        with bound_tensors(self.quantizer, params):
            return fake_quantize(self.quantizer, weight, self.layer if _per_layer(self.quantizer) else None)

    def __repr__(self) -> str:
        return f"{self.__name__}[{self.layer}]"


def _per_layer(quantizer) -> bool:
    return getattr(quantizer, "layers", None) is not None or hasattr(quantizer, "layer_modes")


def _parameter_nodes(gm: fx.GraphModule, ctx: PassContext, quantizer) -> list[fx.Node]:
    """Placeholders for the quantizer's tensors (parameters, buffers), created once per graph."""
    nodes = getattr(ctx, "_quantizer_params", None)
    if nodes is not None:
        return nodes
    graph = gm.graph
    params = quantizer_tensors(quantizer)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = []
    for i, p in enumerate(params):
        with graph.inserting_after(last):
            last = graph.placeholder(f"bitnet_quantizer_tensor_{i}")
        nodes.append(last)
    if params:
        ctx.runtime_inputs.append(lambda: quantizer_tensors(quantizer))
    ctx._quantizer_params = nodes
    return nodes


def check_traceable(call: QuantizerCall, weight_meta: torch.Tensor) -> None:
    """Run the quantizer on fake tensors now, so a quantizer the compiler cannot trace
    fails here with a clear message (and the backend's fallback/strict rules apply)
    instead of inside Inductor, where Dynamo would silently run the frame eagerly."""
    fake_mode = getattr(weight_meta, "fake_mode", None)  # the mode Dynamo recorded the weight in
    if fake_mode is None:
        return
    with fake_mode:
        params = [fake_mode.from_tensor(p) for p in quantizer_tensors(call.quantizer)]
        try:
            out = call(weight_meta, *params)
        except Exception as err:
            raise TypeError(
                f"{type(call.quantizer).__name__} cannot be compiled into the graph ({type(err).__name__}: {err}); "
                "a quantizer used by the backend must be torch code on its input and its own parameters and buffers, "
                "without host reads of tensor values (.item(), float(t), bool(t), a 0-d index tensor, "
                "data-dependent shapes)"
            ) from err
    if tuple(out.shape) != tuple(weight_meta.shape):
        raise ValueError(
            f"{type(call.quantizer).__name__} changed the weight shape {tuple(weight_meta.shape)} -> {tuple(out.shape)}"
        )


def rewrite_linear(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, x, w, b, path: str) -> fx.Node:
    """Replace the linear ``node`` by the custom-quantizer computation; returns the output node."""
    cfg = ctx.config
    quantizer = cfg.weight_quantizer
    graph = gm.graph
    call = QuantizerCall(quantizer, owner(path))
    check_traceable(call, meta(w))
    params = _parameter_nodes(gm, ctx, quantizer)
    with graph.inserting_before(node):
        w_fq = graph.call_function(call, (w, *params))
        if cfg.activation_bits is not None:
            x = graph.call_function(fake_quantize_activations, (x, cfg.activation_bits))
        out = graph.call_function(F.linear, (x, w_fq, b))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def describe(cfg) -> str:
    acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
    return f"custom quantizer {type(cfg.weight_quantizer).__name__} (fake-quantized W, float matmul), {acts}"
