"""Inference graphs: a quantized linear absorbs the activation and residual add after it.

``lowbit_linear`` (which carries the STE for training), and a deployed layer's ``linear_q``,
become ``linear_q`` on the already-quantized operands, whose epilogue computes
``act(acc * s_x * s_w + bias) (+ residual)`` in float32 before the single cast to the
output dtype, so on CUDA the activation and the residual add cost no extra pass
over the output. Absorbed only when the linear's output has no other user.
Training graphs keep ``lowbit_linear``: its autograd rule is the STE.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.graph import meta


def _only_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation(node: fx.Node, src: fx.Node):
    """``(name, last node)`` if ``node`` applies an epilogue activation to ``src``."""
    if node.op != "call_function" or node.args != (src,):
        return None
    if node.target is T.RELU and not node.kwargs:
        square = _only_user(node)
        if square is not None and _is_square(square, node):
            return "relu2", square
        return "relu", node
    if node.target is T.GELU and set(node.kwargs) <= {"approximate"}:
        return ("gelu_tanh" if node.kwargs.get("approximate") == "tanh" else "gelu"), node
    if node.target is T.SILU and not node.kwargs:
        return "silu", node
    return None


def _is_square(node: fx.Node, src: fx.Node) -> bool:
    if node.op != "call_function" or node.args[:1] != (src,) or node.kwargs:
        return False
    return node.args == (src,) if node.target is T.SQUARE else node.target is T.POW and node.args == (src, 2)


def _residual(node: fx.Node, src: fx.Node):
    """The other operand if ``node`` is ``src + r`` or ``r + src`` with r of src's shape and dtype."""
    if node.op != "call_function" or node.target is not T.ADD or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is src else node.args[0] if node.args[1] is src else None
    om, sm = meta(other), meta(node)
    if om is None or sm is None or om.shape != sm.shape or om.dtype != sm.dtype or other is src:
        return None
    return other


def fuse_epilogues(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        operands = _linear_operands(node)
        if operands is None:
            continue
        last, act, residual, chain = node, "none", None, [node]
        user = _only_user(last)
        found = _activation(user, last) if user is not None else None
        if found:
            act, last = found
            chain += [user] if last is user else [user, last]  # relu, then square for relu2
            user = _only_user(last)
        if user is not None and (other := _residual(user, last)) is not None:
            residual, last = other, user
            chain.append(user)
        if node.target is torch.ops.bitnet.linear_q.default and last is node:
            continue  # a deployed layer's linear_q with nothing to absorb
        with graph.inserting_before(last):
            fused = graph.call_function(torch.ops.bitnet.linear_q.default, (*operands, act, residual))
        fused.meta.update(last.meta)
        last.replace_all_uses_with(fused)
        candidate = node.meta.get("bitnet_candidate")
        fused.meta["bitnet_candidate"] = candidate
        if candidate is not None and (act != "none" or residual is not None):
            parts = ([act] if act != "none" else []) + (["residual add"] if residual is not None else [])
            candidate.reason += f", epilogue: {' + '.join(parts)}"
        for absorbed in reversed(chain):
            graph.erase_node(absorbed)


def _linear_operands(node: fx.Node):
    """``linear_q``'s first seven arguments for a quantized linear whose epilogue is still empty:
    a ``lowbit_linear`` on int8 activations, or a deployed layer's plain ``linear_q``."""
    if node.target is torch.ops.bitnet.lowbit_linear.default:
        x, _weight, bias, xq, x_scale, wq, w_scale = node.args[:7]
        xm = meta(x)
        if xq is None or xm is None:
            return None  # weight-only linears keep the float path
        return xq, x_scale, wq, w_scale, bias, xm.shape[-1], xm.dtype
    if node.target is torch.ops.bitnet.linear_q.default and node.args[7:] == ("none", None):
        return node.args[:7]
    return None
