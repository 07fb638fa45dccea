"""Small FX helpers shared by the passes: tensor metadata, parameter paths, and the
quantize nodes every rewrite emits."""
from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]")
_STEP = re.compile(r"""\._(?:modules|parameters|buffers)\[['"]([^'"]+)['"]\]|\.([A-Za-z_]\w*)|\[['"]?([^'"\]]+)['"]?\]""")
# Dynamo names lifted parameters after their source, e.g. L_self_modules_fc_parameters_weight_.
_PLACEHOLDER = re.compile(r"_(?:modules|parameters|buffers)_")


def meta(node) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo or a later trace recorded for ``node`` (None if not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def source_path(source_name: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``."""
    rest = _ROOT.sub("", source_name)
    return ".".join(next(g for g in m.groups() if g is not None) for m in _STEP.finditer(rest))


def parameter_path(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """Module path of the parameter ``node`` stands for, or None if it is not a parameter."""
    if node.op == "get_attr":
        value = _get_attr(gm, node.target)
        return node.target if isinstance(value, torch.nn.Parameter) else None
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    example = getattr(grapharg, "example", None)
    if not isinstance(example, torch.nn.Parameter):
        return None
    name = grapharg.source.name
    name = name() if callable(name) else name
    return source_path(name) or _PLACEHOLDER.sub(".", node.name.strip("_"))


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def owner(param_path: str) -> str:
    """``encoder.fc.weight`` -> ``encoder.fc``; a parameter of the compiled module itself -> ``""``."""
    return param_path.rpartition(".")[0]


def emit_weight_quantization(graph: fx.Graph, w2d: fx.Node, cfg) -> tuple[fx.Node, fx.Node]:
    """``(packed, scale)`` nodes of ``quantize_weights(w2d)`` (inserted at the graph's cursor)."""
    qw = graph.call_function(torch.ops.bitnet.quantize_weights.default, (w2d, cfg.weight, cfg.per_channel))
    return graph.call_function(operator.getitem, (qw, 0)), graph.call_function(operator.getitem, (qw, 1))


def emit_activation_quantization(graph: fx.Graph, x: fx.Node, cfg, per_sample: bool = False):
    """``(int8, scale)`` nodes of the activation quantizer (per token, or per sample for a
    conv), or ``(None, None)`` for weight-only configurations."""
    if cfg.activation_bits is None:
        return None, None
    op = torch.ops.bitnet.quantize_activations_per_sample if per_sample else torch.ops.bitnet.quantize_activations
    qa = graph.call_function(op.default, (x, cfg.activation_bits))
    return graph.call_function(operator.getitem, (qa, 0)), graph.call_function(operator.getitem, (qa, 1))
