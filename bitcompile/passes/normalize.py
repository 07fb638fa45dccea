"""The first pass: every spelling of an operation becomes one canonical node (``targets``), so
the matchers that follow compare with one target each.

Only rewrites that compute exactly the same values are made, and only on tensor-valued nodes:

* tensor methods and other functions of element-wise / binary operations (``x.add(y)``,
  ``torch.add(x, y)``, ``aten.add.Tensor``) -> the canonical function (``operator.add``), unless
  called with an argument that changes the result (``alpha=``, ``out=``, ``inplace=True``);
* casts (``x.float()``, ``x.type(dtype)``) -> ``x.to(dtype)``; ``W.T`` / ``W.mT`` of a matrix ->
  ``torch.t(W)``;
* linears: ``nn.Linear`` modules, ``aten.linear``, ``x @ W.t()`` / ``torch.matmul(x, W.t())``,
  ``torch.addmm(b, x, W.t())`` on a matrix ``W``, and ``torch.addmm(b, x, W)`` on a parameter
  ``W [in, out]`` (transformers' ``Conv1D``, as ``linear(x, torch.t(W), b)``) -> ``F.linear(x, W, b)``;
* convolutions (``nn.Conv1d/2d`` with zero padding, the aten overloads, a non-transposed
  ``aten.convolution``) -> ``torch.conv1d/conv2d(x, w, b, stride, padding, dilation, groups)``;
* batch norms -> ``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``;
* ``torch.ops.bitnet.<op>`` called by the model itself -> its ``.default`` overload, the passes'.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta, parameter_path

_FUNCTION_TO_CANONICAL = {f: canonical for canonical, spellings in T.FUNCTION_SPELLINGS.items() for f in spellings}
_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_DROPPED_KWARGS = {"_stacklevel"}  # bookkeeping of F.softmax, no effect on the value
# Canonical calls with every argument positional (defaults filled in), so matchers unpack args.
_POSITIONAL = {
    T.LINEAR: (("input", "weight", "bias"), (None,)),
    T.RMS_NORM: (("input", "normalized_shape", "weight", "eps"), (None, None)),
    T.LAYER_NORM: (("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5)),
    T.BATCH_NORM: (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        (None, None, False, 0.1, 1e-5),
    ),
    **{
        conv: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
        for conv in T.CONV
    },
}


def normalize_spellings(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("bitnet::"):
            # A bitnet op the model calls itself (a deployed layer's), tuple-valued ones included.
            node.target = target.default
        if not isinstance(meta(node), torch.Tensor):
            continue
        if node.op == "call_module":
            _module_call(gm, node)
        elif node.op == "call_method":
            _method_call(node)
        elif node.op == "call_function":
            _function_call(gm, node)
    graph.lint()


def _plain(node: fx.Node) -> bool:
    """Called without an argument that changes what the canonical form would compute."""
    kwargs = dict(node.kwargs)
    if kwargs.pop("inplace", False):
        return False
    return not ({"alpha", "out", "rounding_mode"} & set(kwargs))


def _retarget(node: fx.Node, target, args: tuple, kwargs: Optional[dict] = None) -> None:
    node.op, node.target, node.args = "call_function", target, args
    kwargs = {k: v for k, v in (node.kwargs if kwargs is None else kwargs).items() if k not in _DROPPED_KWARGS}
    kwargs.pop("inplace", None)
    node.kwargs = kwargs


def _method_call(node: fx.Node) -> None:
    name = node.target
    if name in _CASTS and len(node.args) == 1 and not node.kwargs:
        node.target, node.args = "to", (node.args[0], _CASTS[name])
    elif name == "type" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
        node.target = "to"
    elif name in T.METHOD_SPELLINGS and _plain(node):
        _retarget(node, T.METHOD_SPELLINGS[name], node.args)


def _function_call(gm: fx.GraphModule, node: fx.Node) -> None:
    target = node.target
    if target is getattr and node.args[1] in ("T", "mT") and _matrix(node.args[0]):
        _retarget(node, T.TRANSPOSE_2D, (node.args[0],), {})
    elif target in _FUNCTION_TO_CANONICAL and _plain(node):
        _retarget(node, _FUNCTION_TO_CANONICAL[target], node.args)
    if node.target in (T.MATMUL, torch.addmm, torch.ops.aten.addmm.default):
        _linear_from_matmul(gm, node)
    elif node.target is torch.ops.aten.convolution.default and not node.args[6]:  # not transposed
        x, w, b, stride, padding, dilation, _transposed, _out_pad, groups = node.args
        conv = torch.conv1d if len(stride) == 1 else torch.conv2d
        _retarget(node, conv, (x, w, b, stride, padding, dilation, groups), {})
    elif node.target in (torch.batch_norm, torch.ops.aten.batch_norm.default):
        x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
        _retarget(node, T.BATCH_NORM, (x, mean, var, weight, bias, training, momentum, eps), {})
    if node.target in _POSITIONAL:
        _positional(node, *_POSITIONAL[node.target])
    if node.kwargs.get("inplace", True) is False:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}


def _positional(node: fx.Node, names: tuple, defaults: tuple) -> None:
    """All of ``names`` as positional arguments (keyword or default values moved in)."""
    filled = dict(zip(names[len(names) - len(defaults) :], defaults))
    values = [node.args[i] if i < len(node.args) else node.kwargs.get(n, filled.get(n)) for i, n in enumerate(names)]
    node.args, node.kwargs = tuple(values), {k: v for k, v in node.kwargs.items() if k not in names}


def _matrix(node) -> bool:
    m = meta(node)
    return m is not None and m.dim() == 2


def transposed_matrix(node) -> Optional[fx.Node]:
    """``W`` if ``node`` is ``torch.t(W)`` or ``torch.transpose(W, 0, 1)`` of a matrix ``W``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not _matrix(node.args[0] if node.args else None):
        return None
    if node.target is T.TRANSPOSE_2D and len(node.args) == 1:
        return node.args[0]
    if node.target is T.TRANSPOSE and sorted(d % 2 for d in node.args[1:]) == [0, 1]:
        return node.args[0]
    return None


def _linear_from_matmul(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.kwargs:
        return
    if node.target is T.MATMUL and len(node.args) == 2:
        w = transposed_matrix(node.args[1])
        if w is not None:
            _retarget(node, T.LINEAR, (node.args[0], w, None), {})
    elif len(node.args) == 3:  # addmm(bias, x, W^T) or, for a parameter W [in, out], addmm(bias, x, W)
        bias, x, w = node.args
        wt = transposed_matrix(w)
        if wt is not None:
            _retarget(node, T.LINEAR, (x, wt, bias), {})
        elif isinstance(w, fx.Node) and parameter_path(w, gm) is not None and _matrix(w) and _matrix(x):
            with gm.graph.inserting_before(node):
                w_t = gm.graph.call_function(T.TRANSPOSE_2D, (w,))
            w_t.meta["val"] = meta(w).t()
            _retarget(node, T.LINEAR, (x, w_t, bias), {})


def _module_call(gm: fx.GraphModule, node: fx.Node) -> None:
    """``call_module`` nodes (Dynamo configured not to inline ``nn`` modules)."""
    module = gm.get_submodule(node.target)
    kind = type(module)
    if kind is torch.nn.Linear:
        w, b = _parameter_attrs(gm, node, module)
        _retarget(node, T.LINEAR, (node.args[0], w, b), {})
    elif kind in (torch.nn.Conv1d, torch.nn.Conv2d) and module.padding_mode == "zeros":
        w, b = _parameter_attrs(gm, node, module)
        conv = torch.conv1d if kind is torch.nn.Conv1d else torch.conv2d
        _retarget(node, conv, (node.args[0], w, b, module.stride, module.padding, module.dilation, module.groups), {})


def _parameter_attrs(gm: fx.GraphModule, node: fx.Node, module) -> tuple[fx.Node, Optional[fx.Node]]:
    """``get_attr`` nodes of ``module``'s weight and bias (None without one)."""
    found = []
    with gm.graph.inserting_before(node):
        for name in ("weight", "bias"):
            value = getattr(module, name)
            attr = gm.graph.get_attr(f"{node.target}.{name}") if value is not None else None
            if attr is not None:
                attr.meta["val"] = value
            found.append(attr)
    return found[0], found[1]
