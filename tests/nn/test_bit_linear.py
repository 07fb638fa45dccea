import torch
from torch import nn

from bitcompile.nn import BitLinear
from bitcompile.numerics import reference as ref
from bitcompile.ops import WEIGHT_CACHE


def test_bitlinear_is_a_drop_in_linear_with_the_design_semantics():
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    layer = BitLinear(10, 6)
    layer.load_state_dict(linear.state_dict())  # same state dict keys and shapes
    assert isinstance(layer, nn.Linear)
    x = torch.randn(4, 10)
    q, s = ref.quantize_activations(x)
    trits = (linear.weight / linear.weight.abs().mean()).round().clamp(-1, 1)
    expect = (q.float() @ trits.t()) * s * linear.weight.abs().mean() + linear.bias
    torch.testing.assert_close(layer(x), expect)


def test_norm_option_applies_rmsnorm_before_quantization():
    torch.manual_seed(0)
    layer = BitLinear(8, 4, norm=True, eps=1e-5)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 8) * 5
    plain = BitLinear.from_linear(layer)  # shares weight and bias, no norm
    torch.testing.assert_close(layer(x), plain(nn.functional.rms_norm(x, (8,), layer.norm.weight, 1e-5)))


def test_from_linear_shares_parameters_and_eval_caches():
    linear = nn.Linear(8, 4)
    layer = BitLinear.from_linear(linear, weight="int8")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    layer.eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = layer(x)
        layer(x)
        assert WEIGHT_CACHE.stats.misses == 1 and WEIGHT_CACHE.stats.hits == 1
        linear.weight.mul_(2)  # in-place update: re-packed on the next call
        assert not torch.equal(layer(x), first) and WEIGHT_CACHE.stats.misses == 2
