"""A deployed model (packed buffers only) compiles to what its float model compiles to."""

import copy

import pytest
import torch

import bitcompile
from tests.helpers import EXACT
from tests.passes.fusion_models import Attention

OPTIONS = [
    {},
    {"granularity": "per_channel"},
    {"weight": "binary"},
    {"weight": "int8"},
    {"activation_bits": None},
    {"activation_bits": 4},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_compiled_deployed_model_equals_the_compiled_float_model(options):
    torch.manual_seed(0)
    model, x = Attention(bias=True).eval(), torch.randn(2, 5, 32)
    deployed = bitcompile.deploy(copy.deepcopy(model), **options, exclude=[])
    with torch.no_grad():
        torch._dynamo.reset()
        want = torch.compile(model, backend="bitnet", options={**options, "exclude": []})(x)
        torch._dynamo.reset()
        got = torch.compile(deployed, backend="bitnet")(x)
        eager = deployed(x)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3)  # the norm fusion's float order (README)


def _llama():
    from tests.models import zoo

    torch.manual_seed(0)
    model, ids, _ = zoo.llama()
    return model.eval(), ids(2, 12)


def test_excluded_int8_deploys_the_lm_head_weight_only_and_compiles_to_its_eager_result(tmp_path):
    """``excluded_weights="int8"``: the excluded ``lm_head`` keeps float activations and holds int8
    codes with one absmax scale per row (no float weight); compiled, it equals the deployed model
    run eagerly to float32 summation order, the report names it, and a packed checkpoint of it
    loads back bitwise."""
    pytest.importorskip("transformers")
    from bitcompile.nn import PackedLinear
    from bitcompile.numerics import reference as ref

    model, inputs = _llama()
    weight = model.lm_head.weight.detach().clone()
    deployed = bitcompile.deploy(copy.deepcopy(model), excluded_weights="int8")
    head = deployed.lm_head
    assert isinstance(head, PackedLinear) and head.activation_bits is None
    codes, scale = ref.quantize_weights(weight, "int8", True)
    assert torch.equal(head.weight_packed, codes) and torch.equal(head.weight_scale, scale)
    assert not any(p.numel() == weight.numel() for p in head.parameters())
    with torch.no_grad():
        eager = deployed(**inputs).logits
        compiled = torch.compile(deployed, backend="bitnet")
        got = compiled(**inputs).logits
        float_head = bitcompile.deploy(copy.deepcopy(model))(**inputs).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)  # (the norm fusion's float order)
    # int8 weights: each within half a step (max|row| / 254) of the float weight
    assert (ref.dequantized_weight(codes, scale, 32, torch.float32) - weight).abs().max() <= scale.max() / 2 + 1e-7
    # the logits move by that error times the head's input: ~0.3% of the largest one here
    assert 0 < (eager - float_head).abs().max() < 0.01 * float_head.abs().max()
    layer = next(entry for entry in bitcompile.report_of(compiled).layers if entry.module == "lm_head")
    note = " ".join(text for text, _ in layer.notes)
    assert layer.status == "rewritten" and "int8" in note and "weight-only" in note, layer

    path = tmp_path / "int8_head.safetensors"
    assert bitcompile.save_packed(deployed, path)["lm_head"] == "int8"
    fresh, _ = _llama()
    bitcompile.load_packed(fresh, path, deploy=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, eager)


def test_excluded_int8_leaves_a_tied_head_in_float_with_a_warning_and_rejects_unknown_values():
    pytest.importorskip("transformers")
    from tests.models import zoo

    model, _, _ = zoo.gpt2()  # GPT-2 ties lm_head to the token embedding
    with pytest.warns(UserWarning, match="lm_head stays float: its weight is tied"):
        bitcompile.deploy(model, excluded_weights="int8")
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="valid choices: 'float', 'int8'"):
        bitcompile.deploy(_llama()[0], excluded_weights="int4")
