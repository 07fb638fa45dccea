"""SwiGLU's product and the down projection's activation quantization fused into one op (inference)."""

import pytest
import torch
from torch import nn

import bitcompile
from tests.passes.fusion_models import Attention
from tests.passes.test_fusion import _static, rewritten_targets

bitnet = torch.ops.bitnet


@pytest.fixture(autouse=True)
def gated_on(monkeypatch):
    """The fusion is opt-in (``BITCOMPILE_GATED_QUANT=1``)."""
    monkeypatch.setenv("BITCOMPILE_GATED_QUANT", "1")


class ProductAlsoReturned(nn.Module):
    """The gated product has a second reader: the fusion would have to write it anyway."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = nn.functional.silu(self.gate(x)) * self.up(x)
        return self.down(h), h


@pytest.mark.parametrize("deployed", [False, True])
def test_gated_mlp_input_is_quantized_from_the_fused_gate_up_output(deployed):
    torch.manual_seed(0)
    model, x = Attention(bias=False).eval(), torch.randn(2, 5, 32)
    if deployed:
        model = bitcompile.deploy(model, exclude=[])
    with torch.no_grad():
        targets = rewritten_targets(model, x, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        report = bitcompile.report.LAST
        want = (model if deployed else bitcompile.nn.reference_model(model, exclude=[])).eval()(x)
    assert targets.count(bitnet.gated_quant.default) == 1
    # quantized: the norm's output (q/k/v) and the gated product (down); gate + up is one matmul
    assert targets.count(bitnet.quantize_activations.default) + targets.count(bitnet.norm_quant.default) == 2
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the norm fusion's float order (README)
    notes = {c.module: c.reason for c in report.rewritten}
    assert "input: silu(gate) * up quantized in one kernel" in notes["down"]


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("BITCOMPILE_GATED_QUANT")
    with torch.no_grad():
        targets = rewritten_targets(Attention(bias=False).eval(), torch.randn(2, 5, 32), exclude=[])
    assert bitnet.gated_quant.default not in targets


def test_a_product_read_elsewhere_is_not_fused():
    torch.manual_seed(0)
    with torch.no_grad():
        targets = rewritten_targets(ProductAlsoReturned().eval(), torch.randn(3, 16))
    assert bitnet.gated_quant.default not in targets and bitnet.quantize_activations.default in targets


def test_lowered_to_the_triton_twin_without_cuda_graphs_and_kept_opaque_under_them(monkeypatch):
    # The lowering's device test widened to the CPU (as in test_fusion.py).
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    model, x = Attention(bias=False).eval(), torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = rewritten_targets(model, x, exclude=[])
        torch._dynamo.reset()
        graphed = rewritten_targets(model, x, exclude=[], mode="reduce-overhead")
    assert bitnet.gated_quant_triton.default in plain and bitnet.gated_quant.default not in plain
    assert bitnet.gated_quant.default in graphed and bitnet.gated_quant_triton.default not in graphed
