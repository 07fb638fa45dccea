import copy

import pytest
import torch
from safetensors.torch import load_file

import bitcompile
import bitcompile.nn
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary, unpack_ternary
from tests.helpers import MLP


def compiled_eval(model, x):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model.eval(), backend="bitnet")(x)


def test_save_then_load_gives_a_model_that_quantizes_to_the_saved_codes(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(d_in=10), torch.randn(3, 10)
    path = tmp_path / "model.safetensors"
    assert bitcompile.save_packed(model, path) == {"fc1": "ternary", "fc2": "ternary"}
    stored = load_file(path)
    assert stored["fc1.weight_packed"].dtype == torch.uint8 and stored["fc1.weight_packed"].shape == (16, 3)
    assert "fc1.weight" not in stored and stored["lm_head.weight"].dtype == torch.float32  # excluded: full precision
    expect = compiled_eval(model, x)

    fresh = MLP(d_in=10)
    assert bitcompile.load_packed(fresh, path) == {"fc1": "ternary", "fc2": "ternary"}
    for name in ("fc1", "fc2"):
        wq, scale = ref.quantize_weights(fresh.get_submodule(name).weight.detach())
        assert torch.equal(wq, stored[f"{name}.weight_packed"])  # the codes exactly
        # the scale bitwise, or within the float32 ulps a sum of equal magnitudes can reach
        torch.testing.assert_close(scale, stored[f"{name}.weight_scale"], rtol=3e-7, atol=0)
    torch.testing.assert_close(compiled_eval(fresh, x), expect, rtol=1e-6, atol=1e-6)
    assert fresh.fc1.weight.requires_grad  # a float model: it trains on


def test_deployed_load_is_bitwise_the_saved_model_and_holds_only_packed_weights(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(d_in=10), torch.randn(3, 10)
    path = tmp_path / "model.safetensors"
    bitcompile.save_packed(model, path)
    expect = compiled_eval(model, x)
    fresh = MLP(d_in=10)
    bitcompile.load_packed(fresh, path, deploy=True)
    assert isinstance(fresh.fc1, bitcompile.nn.PackedLinear) and isinstance(fresh.lm_head, torch.nn.Linear)
    assert {n for n, _ in fresh.named_parameters()} == {"lm_head.weight"}
    with torch.no_grad():
        assert torch.equal(fresh(x), expect)  # eager
    torch.testing.assert_close(compiled_eval(fresh, x), expect, rtol=0, atol=0)
    again = tmp_path / "again.safetensors"
    bitcompile.save_packed(fresh, again)  # a deployed model saves its packed weights as they are
    assert all(torch.equal(a, b) for a, b in zip(load_file(path).values(), load_file(again).values()))


def test_deploy_in_memory_matches_the_compiled_float_model_and_refuses_training():
    torch.manual_seed(0)
    model, x = MLP(d_in=10), torch.randn(3, 10)
    expect = compiled_eval(model, x)
    deployed = bitcompile.deploy(copy.deepcopy(model))
    torch.testing.assert_close(compiled_eval(deployed, x), expect, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        deployed(x.requires_grad_())


def test_load_rejects_mismatches(tmp_path):
    path = tmp_path / "m.safetensors"
    bitcompile.save_packed(MLP(d_in=10), path)
    with pytest.raises(ValueError, match="does not match"):
        bitcompile.load_packed(MLP(d_in=12), path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a bitcompile packed checkpoint"):
        bitcompile.load_packed(MLP(), tmp_path / "other.safetensors")


@pytest.mark.parametrize("n,k", [(8, 5), (12, 16), (6, 3)])
def test_transformers_bitnet_layout_roundtrip(n, k):
    trits = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    scale = torch.tensor([0.37])
    hf, hf_scale = bitcompile.to_transformers_bitnet(pack_ternary(trits), scale, k)
    assert hf.shape == ((n + 3) // 4, k) and torch.allclose(hf_scale, 1 / scale)
    packed, back = bitcompile.from_transformers_bitnet(hf, hf_scale, n)
    assert torch.equal(unpack_ternary(packed, k), trits) and torch.allclose(back, scale)


def test_transformers_layout_agrees_with_transformers_itself():
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    trits = torch.randint(-1, 2, (8, 6), dtype=torch.int8)
    theirs = bitnet.pack_weights(trits.clone())
    ours, _ = bitcompile.to_transformers_bitnet(pack_ternary(trits), torch.tensor([1.0]), 6)
    assert torch.equal(ours, theirs)
    packed, _ = bitcompile.from_transformers_bitnet(theirs, torch.tensor([1.0]), 8)
    assert torch.equal(unpack_ternary(packed, 6), trits)
