"""The model-level linear swapper (``bitcompile.Quantizer``) and ``BitNetQuantizer``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bitcompile
from bitcompile.nn import W8A16Linear
from bitcompile.quantizers import memory_footprint
from tests.helpers import MLP
from tests.strategies import tensors


def test_quantizer_swaps_all_but_excluded_and_shrinks_memory():
    torch.manual_seed(0)
    model = nn.Sequential(MLP(), nn.ReLU())
    x = torch.randn(4, 12)
    y_before = model(x)
    q = bitcompile.Quantizer(model, W8A16Linear, ["lm_head"])
    assert q.replaced == ["0.fc1", "0.fc2"]
    assert type(model[0].lm_head) is nn.Linear and isinstance(model[0].fc1, W8A16Linear)
    assert q.memory_after < q.memory_before
    # fc1/fc2: 16x12 + 16x16 fp32 weights (4 B) become int8 (1 B); biases and scales stay fp32.
    assert q.memory_before - q.memory_after == (16 * 12 + 16 * 16) * 3 - 2 * 16 * 4
    assert (model(x) - y_before).abs().max() < 0.05
    assert "MiB" in repr(q)


def test_quantizer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="quantize"):
        bitcompile.Quantizer(MLP(), nn.Linear, [])
    with pytest.raises(ValueError, match="exclude"):
        bitcompile.Quantizer(MLP(), W8A16Linear, "lm_head")


def test_quantizer_on_a_transformers_model_built_from_a_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    footprint = model.get_memory_footprint()
    q = bitcompile.Quantizer(model, W8A16Linear, ["lm_head"])
    assert len(q.replaced) == 7  # q, k, v, o, gate, up, down
    assert type(model.lm_head) is nn.Linear
    assert model.get_memory_footprint() < footprint and q.memory_after < q.memory_before
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


@given(st.data(), st.sampled_from([1.58, "ternary", 1, 2, 4, 8]))
def test_bitnet_quantizer_weights(data, precision):
    w = data.draw(tensors((6, 10)))
    bq = bitcompile.BitNetQuantizer(precision=precision)
    q = bq.quantize_weights(w)
    codes = q.codes
    if bq.scheme == "int":
        qmax = 2 ** (precision - 1) - 1
        assert int(codes.abs().max()) <= qmax
        step = w.abs().amax(dim=1, keepdim=True) / qmax
        # dequantize(quantize(w)) within half a step per channel (absmax: nothing is clipped).
        assert bool(((bq.dequantize(q) - w).abs() <= step / 2 * (1 + 1e-5)).all())
    else:
        wq, s = torch.ops.bitnet.quantize_weights(w, "ternary" if bq.scheme == "ternary" else "binary", False)
        assert torch.equal(q.codes.reshape(6, 10), bitcompile.quant.unpack_ternary(wq, 10))
        assert torch.equal(bq.dequantize(q), q.codes.float() * s)


@given(st.data(), st.sampled_from([1.58, 4, 8]))
def test_bitnet_quantizer_activations(data, precision):
    x = data.draw(tensors((3, 7)))
    bq = bitcompile.BitNetQuantizer(precision)
    q = bq.quantize_activations(x)
    ref_q, ref_s = torch.ops.bitnet.quantize_activations(x, bq.activation_bits)
    assert torch.equal(q.codes, ref_q) and torch.equal(q.scale, ref_s)
    assert bool(((bq.dequantize(q) - x).abs() <= ref_s / 2 * (1 + 1e-5)).all())


def test_bitnet_quantizer_seed_usage_and_errors():
    layer = nn.Linear(16, 8)
    bq = bitcompile.BitNetQuantizer(precision=8)
    qw = bq.quantize_weights(layer.weight)
    qa = bq.quantize_activations(layer(torch.randn(1, 16)))
    assert bq.dequantize(qw).shape == (8, 16) and bq.dequantize(qa).shape == (1, 8)
    # The STE carrier: gradients flow to the latent weight.
    bq.dequantize(qw).sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones(8, 16))
    with pytest.raises(ValueError, match="1.58"):
        bitcompile.BitNetQuantizer(precision=16)


def test_memory_footprint_counts_shared_tensors_once():
    a = nn.Linear(4, 4)
    model = nn.ModuleList([a, a])
    assert memory_footprint(model) == (16 + 4) * 4


def test_w8a16_model_compiles_with_the_backend():
    torch.manual_seed(0)
    model = MLP().eval()
    bitcompile.Quantizer(model, W8A16Linear, ["lm_head"])
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="bitnet", options={"strict": True})
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
