"""Quantizer objects as the backend's weight quantizer: compiled == eager, gradients
reach the quantizer's parameters through the compiled graph, and an optimizer trains them."""

import copy

import pytest
import torch
from torch import nn

import bitcompile.quant as Q
from bitcompile import report as reports
from bitcompile.config import BitConfig
from bitcompile.quant import quantized_linear_with
from tests.helpers import MLP


class PlainLearnedQuantizer:
    """Not an nn.Module: a plain object holding its learnable tensors as attributes."""

    def __init__(self):
        self.threshold = torch.tensor(0.1, requires_grad=True)
        self.scale = torch.tensor(0.2, requires_grad=True)

    def quantize(self, x):
        return Q.learned_quantize(x, self.threshold, -self.threshold, self.scale, self.scale, temperature=0.05)

    def dequantize(self, q):
        return q.dequantize()

    def parameters(self):
        return [self.threshold, self.scale]


QUANTIZERS = {
    "lsq": lambda: Q.LSQQuantizer(4, step=0.05),
    "layer_adaptive": lambda: Q.LayerAdaptiveQuantizer(layers=["fc1", "fc2"], scale=[0.15, 0.12]),
    "percentile": lambda: Q.PercentileQuantizer(0.5),
    "plain_object": PlainLearnedQuantizer,
    "soft": lambda: Q.SoftQuantizer(0.5, scale=0.15),
    "outlier": lambda: Q.OutlierAwareQuantizer(0.05),
    "blockwise": lambda: Q.BlockwiseMixedPrecisionQuantizer(4, high_precision_fraction=0.25),
    "mixed_precision": lambda: Q.MixedPrecisionQuantizer(["binary", "ternary"], layers=["fc1", "fc2"]),
    "ternary_per_channel": lambda: Q.TernaryQuantizer(per_channel=True),
}


def eager_forward(model, quantizer, x, activation_bits=8):
    h = torch.relu(quantized_linear_with(quantizer, x, model.fc1.weight, model.fc1.bias, activation_bits, "fc1"))
    h = torch.relu(quantized_linear_with(quantizer, h, model.fc2.weight, model.fc2.bias, activation_bits, "fc2"))
    return model.lm_head(h)  # excluded by default


def _grads(obj):
    return [p.grad for p in obj.parameters()]


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_compiled_matches_eager_with_gradients(name):
    torch.manual_seed(0)
    model, quantizer = MLP(), QUANTIZERS[name]()
    ref_model, ref_quantizer = copy.deepcopy(model), copy.deepcopy(quantizer)
    x = torch.randn(4, 12)
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer, "strict": True})
    torch._dynamo.utils.counters.clear()
    with reports.collecting() as report:
        y = compiled(x)
    rewritten = [c.module for c in report.candidates if c.rewritten]
    assert rewritten == ["fc1", "fc2"] and "custom quantizer" in report.candidates[0].reason
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, no graph break
    y_ref = eager_forward(ref_model, ref_quantizer, x)
    # Same ops in the same order; Inductor may fuse/reorder float arithmetic: a few ulps.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for g, g_ref in zip(_grads(model), _grads(ref_model)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    for g, g_ref in zip(_grads(quantizer), _grads(ref_quantizer)):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_optimizer_trains_quantizer_parameters_through_the_compiled_graph():
    torch.manual_seed(0)
    model, quantizer = MLP(), Q.LSQQuantizer(4, step=0.05)
    opt = torch.optim.SGD([*model.parameters(), *quantizer.parameters()], lr=0.05)
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer})
    x, target = torch.randn(8, 12), torch.randn(8, 5)
    before = quantizer.step.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(compiled(x), target).backward()
        opt.step()
    assert not torch.equal(quantizer.step.detach(), before)
    # The compiled graph reads the updated step (fed at call time): eager agrees after training.
    torch.testing.assert_close(compiled(x), eager_forward(model, quantizer, x), rtol=1e-5, atol=1e-6)


def test_inference_with_a_custom_quantizer_and_weight_only():
    torch.manual_seed(0)
    model, quantizer = MLP(), Q.LogQuantizer(4)
    model.eval()
    compiled = torch.compile(
        model, backend="bitnet", options={"weight": quantizer, "activation_bits": None, "strict": True}
    )
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x), eager_forward(model, quantizer, x, activation_bits=None), rtol=1e-5, atol=1e-6
        )


def test_config_accepts_quantizers_and_rejects_other_objects():
    q = Q.LSQQuantizer()
    cfg = BitConfig(weight=q)
    assert cfg.weight_quantizer is q and cfg.weight == "ternary"
    with pytest.raises(TypeError, match="lacks quantize, dequantize, parameters"):
        BitConfig(weight=object())
    with pytest.raises(ValueError, match="valid choices"):
        BitConfig(weight="quinary")


class HostReadingQuantizer(Q.TernaryQuantizer):
    def quantize(self, x):
        return Q.threshold_quantize(x, threshold=float(x.abs().mean()))  # a host read of a tensor value


def test_untraceable_quantizer_fails_clearly_not_silently():
    model = MLP()
    compiled = torch.compile(model, backend="bitnet", options={"weight": HostReadingQuantizer(), "strict": True})
    with pytest.raises(Exception, match="cannot be compiled into the graph"):
        compiled(torch.randn(2, 12))
    torch._dynamo.reset()
    lenient = torch.compile(model, backend="bitnet", options={"weight": HostReadingQuantizer()})
    with pytest.warns(UserWarning, match="cannot be compiled into the graph"):
        lenient(torch.randn(2, 12))


class BufferScaleQuantizer(Q.BaseQuantizer):
    """Ternary with a scale held in a buffer (set by the user, not learned)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor(0.1))

    def quantize(self, x):
        trits = (x.detach() / self.s).round().clamp(-1, 1).to(torch.int8)
        return Q.TernaryTensor(trits, self.s, grad_carrier=Q.primitives.ste_carrier(x))

    def dequantize(self, q):
        return q.dequantize()


def test_quantizer_buffers_are_fed_at_call_time():
    torch.manual_seed(0)
    model, quantizer = MLP(), BufferScaleQuantizer()
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer, "strict": True})
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), eager_forward(model, quantizer, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        quantizer.s.fill_(0.2)  # a changed buffer is read by the compiled graph without recompiling
    torch.testing.assert_close(compiled(x), eager_forward(model, quantizer, x), rtol=1e-5, atol=1e-6)


def test_per_layer_lsq_trains_one_step_size_per_linear():
    torch.manual_seed(0)
    model = MLP()
    quantizer = Q.PerLayerQuantizer.for_model(model, lambda w: Q.LSQQuantizer.from_tensor(w, 4))
    assert quantizer.layers == ["fc1", "fc2"]  # lm_head excluded, as by the backend
    ref_model, ref_quantizer = copy.deepcopy(model), copy.deepcopy(quantizer)
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer, "strict": True})
    x = torch.randn(4, 12)
    y, y_ref = compiled(x), eager_forward(ref_model, ref_quantizer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    steps = [q.step for q in quantizer.per_layer]
    assert steps[0].item() != steps[1].item()  # initialized from each layer's own weights
    for s, s_ref in zip(steps, [q.step for q in ref_quantizer.per_layer]):
        assert s.grad is not None and s.grad.abs() > 0
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(KeyError, match="known layers"):
        quantizer.quantize(torch.randn(3, 3), "lm_head")


class NormResidualBlock(nn.Module):
    """RMSNorm -> linear -> SiLU -> linear + residual: the pattern the fusion passes look for."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.up(self.norm(x))))


@pytest.mark.parametrize("training", [True, False])
def test_custom_quantizer_with_norms_and_residuals(training):
    torch.manual_seed(0)
    block, quantizer = NormResidualBlock(), Q.LSQQuantizer(4, step=0.05)
    block.train(training)
    compiled = torch.compile(block, backend="bitnet", options={"weight": quantizer, "strict": True})
    x = torch.randn(2, 3, 16)

    def eager(x):
        h = nn.functional.silu(quantized_linear_with(quantizer, block.norm(x), block.up.weight, block.up.bias, 8, "up"))
        return x + quantized_linear_with(quantizer, h, block.down.weight, block.down.bias, 8, "down")

    with torch.set_grad_enabled(training):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
