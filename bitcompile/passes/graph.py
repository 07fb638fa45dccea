"""Small FX helpers shared by the passes: tensor metadata, parameter paths, the reasons
and report entries every rewrite shares, and the quantize nodes every rewrite emits."""

from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.report import Candidate

# Meta key of a subgraph placeholder fed by a parameter of the enclosing graph: its module path.
PARAMETER_OF = "bitnet_parameter_path"

# Dynamo's name for the compiled module: a frame local (L['self']), a global, or an argument of a
# decorated forward (L['args'][0]: transformers >= 5.24 wraps forward in *args decorators).
_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\](?:\[\d+\])*")
_STEP = re.compile(
    r"""\._(?:modules|parameters|buffers)\[['"]([^'"]+)['"]\]|\.([A-Za-z_]\w*)|\[['"]?([^'"\]]+)['"]?\]"""
)
# Dynamo names lifted parameters after their source, e.g. L_self_modules_fc_parameters_weight_.
_PLACEHOLDER = re.compile(r"_(?:modules|parameters|buffers)_")


def meta(node) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo or a later trace recorded for ``node`` (None if not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def strip_root(source_name: str) -> str:
    """``L['self'].fc`` -> ``.fc``: the path below the compiled module."""
    return _ROOT.sub("", source_name)


def source_path(source_name: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``."""
    rest = strip_root(source_name)
    return ".".join(next(g for g in m.groups() if g is not None) for m in _STEP.finditer(rest))


def parameter_path(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """Module path of the parameter ``node`` stands for, or None if it is not a parameter."""
    if node.op == "get_attr":
        value = _get_attr(gm, node.target)
        return node.target if isinstance(value, torch.nn.Parameter) else None
    if node.op != "placeholder":
        return None
    if PARAMETER_OF in node.meta:  # an input of a checkpointed region that is an outer parameter
        return node.meta[PARAMETER_OF]
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    example = getattr(grapharg, "example", None)
    if not isinstance(example, torch.nn.Parameter):
        return None
    name = grapharg.source.name
    name = name() if callable(name) else name
    return source_path(name) or _PLACEHOLDER.sub(".", node.name.strip("_"))


def buffer_path(node, gm: fx.GraphModule) -> Optional[str]:
    """Module path of the buffer ``node`` stands for (a deployed layer's packed weights), or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target if any(name == node.target for name, _ in gm.named_buffers()) else None
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    if grapharg is None or isinstance(getattr(grapharg, "example", None), torch.nn.Parameter):
        return None
    name = grapharg.source.name
    name = name() if callable(name) else name
    return source_path(name) if "_buffers" in name else None


def caller_module(node: fx.Node) -> str:
    """The module that called ``node`` (from Dynamo's ``nn_module_stack``), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    return (strip_root(list(stack.values())[-1][0]).lstrip(".") if stack else "") or node.name


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_call(node: fx.Node) -> dict:
    """An ``F.scaled_dot_product_attention`` node's arguments by name, defaults filled in."""
    return {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def owner(param_path: str) -> str:
    """``encoder.fc.weight`` -> ``encoder.fc``; a parameter of the compiled module itself -> ``""``."""
    return param_path.rpartition(".")[0]


def dims(m: Optional[torch.Tensor]) -> str:
    """``[2, 16]`` for a tensor's metadata, ``?`` without it (report shapes)."""
    return str(list(m.shape)) if m is not None else "?"


def dtype_name(m: Optional[torch.Tensor]) -> str:
    return str(m.dtype).removeprefix("torch.") if m is not None else "?"


def parameter_skip_reason(path: Optional[str], ctx) -> str:
    """What every weight rewrite checks first: the weight is a parameter, and the user did
    not exclude its module ('' if neither applies)."""
    if path is None:
        return "weight is not a parameter (computed or passed in)"
    pattern = ctx.config.excluded(owner(path))
    return f"excluded by pattern {pattern!r}" if pattern else ""


def record(ctx, op: str, module: str, shape: str, dtype: str, reason: str, detail: str, **extra) -> Candidate:
    """Add one candidate to the report: rewritten when there is no ``reason`` (then ``detail``
    says how)."""
    candidate = Candidate(
        graph=ctx.graph_index,
        op=op,
        module=module,
        shape=shape,
        dtype=dtype,
        rewritten=not reason,
        reason=reason or detail,
        **extra,
    )
    ctx.report.candidates.append(candidate)
    return candidate


def emit_weight_quantization(graph: fx.Graph, w2d: fx.Node, cfg) -> tuple[fx.Node, fx.Node]:
    """``(packed, scale)`` nodes of ``quantize_weights(w2d)`` (inserted at the graph's cursor)."""
    qw = graph.call_function(torch.ops.bitnet.quantize_weights.default, (w2d, cfg.weight, cfg.per_channel))
    return graph.call_function(operator.getitem, (qw, 0)), graph.call_function(operator.getitem, (qw, 1))


def describe_weights(cfg) -> str:
    """The report's note for a rewritten weight layer: scheme, granularity, activation bits."""
    acts = f"A{cfg.activation_bits}" if cfg.activation_bits else "A-float"
    return f"{cfg.weight} W ({'per-channel' if cfg.per_channel else 'per-tensor'}), {acts}"


def _grad_input_bits(ctx):
    return ctx.config.grad_input_bits if ctx.training else None


def grad_note(ctx) -> str:
    """The report's note for a linear whose input gradient is quantized."""
    bits = _grad_input_bits(ctx)
    return "" if bits is None else f", int{bits} output grads for the input gradient"


def emit_lowbit_linear(graph: fx.Graph, args: tuple, ctx) -> fx.Node:
    """A ``lowbit_linear`` node; in training graphs it carries ``grad_input_bits`` if set."""
    bits = _grad_input_bits(ctx)
    kwargs = {} if bits is None else {"grad_input_bits": bits}
    return graph.call_function(torch.ops.bitnet.lowbit_linear.default, args, kwargs)


def emit_autocast_input(graph: fx.Graph, x: fx.Node, layer: fx.Node) -> fx.Node:
    """``x`` cast to ``layer``'s output dtype where they differ: the layer ran under autocast,
    which casts a linear's or conv's inputs (``reference.autocast_input``, as the eager layers).
    Layers that read the same ``x`` (q/k/v, gate/up) share one cast, and so one quantization:
    the layers are rewritten in graph order, so an earlier layer's cast precedes this one."""
    xm, out = meta(x), meta(layer)
    if xm is None or out is None or xm.dtype == out.dtype or not out.is_floating_point():
        return x
    for user in x.users:
        if user.meta.get("bitnet_autocast_input") and user.args == (x, out.dtype):
            return user
    cast = graph.call_method("to", (x, out.dtype))
    cast.meta["val"] = xm.to(out.dtype)
    cast.meta["bitnet_autocast_input"] = True
    return cast


def emit_activation_quantization(graph: fx.Graph, x: fx.Node, cfg, per_sample: bool = False):
    """``(int8, scale)`` nodes of the activation quantizer (per token, or per sample for a
    conv), or ``(None, None)`` for weight-only configurations."""
    if cfg.activation_bits is None:
        return None, None
    op = torch.ops.bitnet.quantize_activations_per_sample if per_sample else torch.ops.bitnet.quantize_activations
    for user in x.users:  # layers reading the same input share its quantization (as above)
        if user.meta.get("bitnet_shared_input") and user.target is op.default and user.args == (x, cfg.activation_bits):
            items = {u.args[1]: u for u in user.users if u.target is operator.getitem}
            if set(items) == {0, 1}:
                return items[0], items[1]
    qa = graph.call_function(op.default, (x, cfg.activation_bits))
    qa.meta["bitnet_shared_input"] = True
    return graph.call_function(operator.getitem, (qa, 0)), graph.call_function(operator.getitem, (qa, 1))


def swiglu_product(product: fx.Node):
    """``(y, [product, silu, gate half, up half])`` if ``product = silu(y[..., :n]) * y[..., n:]``
    with ``y`` 2n wide, the product and the silu read by nothing else; else None."""
    if not (isinstance(product, fx.Node) and product.target is T.MUL and len(product.users) == 1):
        return None
    for act, up in (product.args, product.args[::-1]):
        if not (isinstance(act, fx.Node) and act.target is T.SILU and not act.kwargs and len(act.users) == 1):
            continue
        gate = act.args[0]
        halves = [_narrowed(gate), _narrowed(up)]
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


def _narrowed(node):
    """``(y, start, width)`` of ``torch.narrow(y, -1, start, width)`` (the sibling fusion's split)."""
    if not (isinstance(node, fx.Node) and node.target is torch.narrow and not node.kwargs):
        return None
    y, dim, start, width = node.args
    ym = meta(y)
    if ym is None or dim not in (-1, ym.dim() - 1) or not all(isinstance(v, int) for v in (start, width)):
        return None
    return y, start, width
