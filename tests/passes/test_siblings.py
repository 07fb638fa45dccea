"""Sibling linears (q/k/v, gate/up) fused into one packed matmul: bitwise the unfused graph."""

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.passes import manager
from tests.helpers import EXACT
from tests.passes.fusion_models import Attention


def compiled(model, x, siblings=True, monkeypatch=None):
    """Compiled without the fusions of SwiGLU's product, which need the fused gate/up matmul (their
    product rounds as eager does, the unfused graph's as Inductor fuses it): only the sibling
    fusion differs between the two graphs compared here."""
    torch._dynamo.reset()
    dropped = ("gated_quant", "swiglu") if siblings else ("gated_quant", "swiglu", "siblings")
    if monkeypatch is not None:
        monkeypatch.setattr(manager, "PASSES", tuple(p for p in manager.PASSES if p.name not in dropped))
    with torch.no_grad():
        out = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
    if monkeypatch is not None:
        monkeypatch.undo()
    return out, bitcompile.report.LAST


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_are_one_matmul_and_bitwise_the_unfused_graph(bias, monkeypatch):
    torch.manual_seed(0)
    model, x = Attention(bias).eval(), torch.randn(2, 5, 32)
    fused, report = compiled(model, x, monkeypatch=monkeypatch)
    unfused, _ = compiled(model, x, siblings=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(fused, unfused, **EXACT)
    notes = {c.module: c.reason for c in report.rewritten}
    assert "sibling-fused: q + k + v (one matmul, 48 rows)" in notes["q"] and "q + k + v" in notes["v"]
    assert "sibling-fused: gate + up (one matmul, 96 rows)" in notes["up"]
    assert "sibling" not in notes["down"]


def test_fused_siblings_follow_weight_updates():
    torch.manual_seed(0)
    model, x = Attention(False).eval(), torch.randn(2, 5, 32)
    run = torch.compile(model, backend="bitnet", options={"exclude": []})
    with torch.no_grad():
        before = run(x)
        model.k.weight.mul_(-1.0)  # an in-place update bumps the version the cache checks
        after = run(x)
        want = bitcompile.nn.reference_model(model, exclude=[]).eval()(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=1e-3, atol=1e-3)  # the norm fusion's float order (README)


def test_siblings_with_and_without_bias_stay_apart():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16, bias=True), nn.Linear(16, 16, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    _, report = compiled(Mixed().eval(), torch.randn(3, 16))
    assert all("sibling" not in c.reason for c in report.rewritten)


@pytest.mark.parametrize("bias", [False, True])
def test_deployed_layers_fuse_like_float_ones(bias, monkeypatch):
    """A deployed model (packed buffers, ``bitcompile.deploy``) gets the same fusions as the float
    model it came from: norm + quantization, q/k/v and gate/up as one matmul each, bitwise the
    graph without the sibling fusion, and its eager forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    deployed = bitcompile.deploy(Attention(bias).eval())
    with torch.no_grad():
        eager = deployed(x)
    fused, report = compiled(deployed, x, monkeypatch=monkeypatch)
    unfused, _ = compiled(deployed, x, siblings=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(fused, unfused, **EXACT)
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-3)  # the norm fusion's float order (README)
    notes = {c.module: c.reason for c in report.rewritten}
    assert "deployed" in notes["q"] and "sibling-fused: q + k + v (one matmul, 48 rows)" in notes["q"]
    assert "sibling-fused: gate + up (one matmul, 96 rows)" in notes["up"]
    assert any(c.op.endswith("+quant") for c in report.rewritten)  # the RMSNorm fused with quantization
