import pytest
import torch
from safetensors.torch import load_file

import bitcompile
from bitcompile.ops import WEIGHT_CACHE
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary, unpack_ternary
from tests.helpers import MLP


def test_save_load_roundtrip_serves_the_exact_packed_weights(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(d_in=10), torch.randn(3, 10)
    path = tmp_path / "model.safetensors"
    assert bitcompile.save_packed(model, path) == {"fc1": "ternary", "fc2": "ternary"}
    stored = load_file(path)
    assert stored["fc1.weight_packed"].dtype == torch.uint8 and stored["fc1.weight_packed"].shape == (16, 3)
    assert "fc1.weight" not in stored and stored["lm_head.weight"].dtype == torch.float32  # excluded: full precision
    model.eval()
    with torch.no_grad():
        expect = torch.compile(model, backend="bitnet")(x)

    torch._dynamo.reset()
    WEIGHT_CACHE.clear()
    fresh = MLP(d_in=10).eval()
    bitcompile.load_packed(fresh, path)
    wq, scale = ref.quantize_weights(model.fc1.weight.detach())
    torch.testing.assert_close(fresh.fc1.weight, ref.dequantized_weight(wq, scale, 10, torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fresh, backend="bitnet")(x), expect, rtol=0, atol=0)
    assert WEIGHT_CACHE.stats.misses == 0  # served from the checkpoint, not re-quantized


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
