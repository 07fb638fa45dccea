"""The normalization pass: every spelling becomes its canonical target, values unchanged."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.passes import targets as T
from bitcompile.passes.context import PassContext
from bitcompile.passes.normalize import normalize_spellings


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.w_in_out = nn.Parameter(torch.randn(8, 6))  # transformers' Conv1D layout
        self.b = nn.Parameter(torch.randn(6))
        self.conv = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x, img):
        h = x.add(x).mul(0.5) + torch.add(x, x) + torch.mul(x, 2.0) - torch.sub(x, 1.0)
        h = torch.add(h, x, alpha=2.0)  # alpha changes the value: kept as written
        h = F.relu(h) + h.relu() + F.silu(h) + torch._C._nn.silu(h) + h.pow(2) + h.square()
        r = h.float().pow(2).mean(-1, keepdim=True).rsqrt() + h.type(torch.float32).div(3.0)
        lin = x @ self.w.T + torch.matmul(x, self.w.t()) + torch.addmm(self.b, x, self.w.t())
        lin = lin + x @ self.w.transpose(0, 1) + torch.addmm(self.b, x, self.w_in_out) + F.linear(x, weight=self.w)
        p = lin.softmax(-1) + F.softmax(lin, dim=-1)
        y = torch.ops.aten.convolution.default(img, self.conv, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        y = torch.batch_norm(y, None, None, self.mean, self.var, False, 0.1, 1e-5, False) + F.conv2d(
            img, self.conv, padding=1
        )
        return h.sum() + r.sum() + p.sum() + y.sum()


def normalized(model, *inputs):
    graphs = []

    def backend(gm, example_inputs):
        normalize_spellings(gm, PassContext(config=BitConfig(), training=False))
        gm.recompile()
        graphs.append(gm)
        return gm.forward

    out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return out, graphs[0]


def test_spellings_become_canonical_with_the_same_values():
    torch.manual_seed(0)
    model, x, img = Spellings(), torch.randn(3, 8), torch.randn(2, 2, 5, 5)
    out, gm = normalized(model, x, img)
    assert torch.equal(out, model(x, img))  # the same operations, only spelled differently
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    methods = {n.target for n in nodes if n.op == "call_method"}
    assert methods <= {T.CAST, "sum"}, methods
    targets = [n.target for n in nodes if n.op == "call_function"]
    assert targets.count(T.LINEAR) == 6  # five hand-written forms and F.linear with a keyword weight
    assert all(len(n.args) == 3 and not n.kwargs for n in nodes if n.target is T.LINEAR)
    assert targets.count(torch.add) == 1  # the alpha= call
    for spelling in (
        torch.mul,
        torch.sub,
        torch.matmul,
        torch.addmm,
        F.relu,
        torch._C._nn.silu,
        F.softmax,
        torch.ops.aten.convolution.default,
        torch.batch_norm,
    ):
        assert spelling not in targets, spelling
    assert targets.count(torch.conv2d) == 2 and T.BATCH_NORM in targets
    assert targets.count(T.SOFTMAX) == 2 and targets.count(T.RELU) == 2 and targets.count(T.SILU) == 2
    assert operator.add in targets and T.RSQRT in targets and T.MEAN in targets


def test_in_place_and_integer_arithmetic_keep_their_spelling():
    def f(x, n: int):
        y = F.relu(x.clone(), inplace=True)
        return y, n + 1

    out, gm = normalized(f, torch.randn(4), 3)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.relu in targets and T.RELU not in targets
