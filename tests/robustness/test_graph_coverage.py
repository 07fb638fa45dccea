"""Graphs the backend used to give up on or leave in float: shared weights, activation
checkpointing, autocast. Each compiled model equals its eager twin and reports every layer."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bitcompile
from bitcompile.backend import BitcompileFallbackWarning
from bitcompile.nn import reference_model
from bitcompile.numerics import reference as ref
from tests.helpers import EXACT


class SharedWeights(nn.Module):
    """A module called twice, tied linears, an ALBERT-style shared layer and an unrolled cell."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.tied_a, self.tied_b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.tied_b.weight = self.tied_a.weight
        self.shared_layer = nn.Linear(8, 8)
        self.cell = nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc(torch.relu(self.fc(x)))
        h = self.tied_b(self.tied_a(h))
        for _ in range(3):
            h = h + torch.relu(self.shared_layer(h))
        state = torch.zeros_like(h)
        for _ in range(2):
            state = torch.tanh(self.cell(torch.cat([h, state], -1)))
        return state


@pytest.mark.parametrize("grad", [False, True])
def test_each_shared_weight_is_packed_once_and_feeds_every_use(grad):
    torch.manual_seed(0)
    model = SharedWeights()
    twin = reference_model(model, exclude=[])
    x = torch.randn(3, 8)
    model.train(grad)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error", BitcompileFallbackWarning)
        report = bitcompile.explain(model, x, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        torch.testing.assert_close(got, twin(x), **EXACT)
    assert not report.fallbacks and not report.skipped
    assert len(report.rewritten) == 2 + 2 + 3 + 2  # every call of every layer
    if not grad:
        assert {c.module for c in report.rewritten} == {"fc", "tied_a", "shared_layer", "cell"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()

    def forward(self, x):
        return self.b(checkpoint(self.a, x, use_reentrant=False))


@pytest.mark.parametrize("grad", [False, True])
def test_layers_inside_activation_checkpointing_are_rewritten(grad):
    torch.manual_seed(0)
    model = Checkpointed()
    twin = reference_model(model, exclude=[])
    x = torch.randn(3, 8, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        report = bitcompile.explain(model, x, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        want = twin(x)
    assert sorted(c.module for c in report.rewritten if c.op == "linear") == ["a.fc1", "a.fc2", "b.fc1", "b.fc2"]
    torch.testing.assert_close(got, want, **EXACT)
    if grad:
        got.sum().backward()
        want.sum().backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **EXACT)  # the recomputed forward quantizes alike


def test_integer_accumulation_stays_exact_under_autocast():
    torch.manual_seed(0)
    xq, _ = ref.quantize_activations(torch.randn(4, 300))
    wq, _ = ref.quantize_weights(torch.randn(16, 300))
    exact = xq.long() @ ref.unpack_weights(wq, 300).long().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ref.lowbit_matmul(xq, wq, 300).long(), exact)
        assert torch.equal(torch.ops.bitnet.lowbit_matmul(xq, wq, 300).long(), exact)


@pytest.mark.parametrize("grad", [False, True])
def test_output_dtype_follows_autocast_in_both_grad_modes(grad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8), nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 3, 3))
    twin = reference_model(model, exclude=[])
    x = torch.randn(4, 64, requires_grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        want = twin(x)
        assert got.dtype == want.dtype == model(x).dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **EXACT)
