"""TernaryMultiheadAttention against nn.MultiheadAttention on the dequantized weights."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bitcompile.nn import TernaryMultiheadAttention
from bitcompile.nn.ternary_attention import save_attention_heatmap
from bitcompile.numerics import reference as ref


def reference_mha(layer: TernaryMultiheadAttention) -> nn.MultiheadAttention:
    """torch's MHA holding the ternary layer's dequantized weights (trits * absmean scale)."""
    e = layer.embed_dim
    mha = nn.MultiheadAttention(e, layer.num_heads, batch_first=layer.batch_first)
    with torch.no_grad():
        for name, w in (("in_proj_weight", layer.in_proj_weight), ("out_proj.weight", layer.out_proj.weight)):
            s = ref.weight_scale(w, "ternary", False)
            target = mha.in_proj_weight if name == "in_proj_weight" else mha.out_proj.weight
            target.copy_(ref.weight_integers(w, s, "ternary").float() * s)
        mha.in_proj_bias.copy_(layer.in_proj_bias)
        mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha.eval()


@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 6),
    st.sampled_from([(8, 2), (12, 3), (4, 1)]),
    st.booleans(),
    st.sampled_from(["self", "cross_kv", "cross"]),
    st.integers(0, 99),
)
def test_matches_torch_mha_on_dequantized_weights(batch, lq, ls, dims, batch_first, mode, seed):
    torch.manual_seed(seed)
    e, h = dims
    layer = TernaryMultiheadAttention(e, h, batch_first=batch_first, activation_bits=None).eval()
    with torch.no_grad():
        layer.in_proj_bias.normal_()
        layer.out_proj.bias.normal_()
    shape = lambda n: (batch, n, e) if batch_first else (n, batch, e)  # noqa: E731
    q = torch.randn(shape(lq))
    if mode == "self":
        k = v = q
    elif mode == "cross_kv":
        k = v = torch.randn(shape(ls))
    else:
        k, v = torch.randn(shape(ls)), torch.randn(shape(ls))
    with torch.no_grad():
        out, attn = layer(q, k, v)
        ref_out, ref_attn = reference_mha(layer)(q, k, v)
    # Weight-only: the same float math on the same dequantized weights, in a different order.
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-4, atol=1e-6)
    assert attn.shape == (batch, lq, lq if mode == "self" else ls)


def test_int8_activations_match_a_fake_quantized_reference():
    torch.manual_seed(0)
    layer = TernaryMultiheadAttention(8, 2, batch_first=True)  # A8 by default
    x = torch.randn(2, 5, 8)
    out, attn = layer(x, need_weights=True, average_attn_weights=False)
    assert attn.shape == (2, 2, 5, 5)

    def fq(t):  # per-token absmax int8 fake quantization, the reference formula
        q, s = ref.quantize_activations(t, 8)
        return q.float() * s

    wqkv = reference_mha(layer).in_proj_weight
    wo = reference_mha(layer).out_proj.weight
    qkv = fq(x) @ wqkv.t() + layer.in_proj_bias
    qh, kh, vh = (t.reshape(2, 5, 2, 4).transpose(1, 2) for t in qkv.chunk(3, -1))
    p = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1)
    ctx = (p @ vh).transpose(1, 2).reshape(2, 5, 8)
    expected = fq(ctx) @ wo.t() + layer.out_proj.bias
    torch.testing.assert_close(attn, p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_training_gradients_and_masks():
    torch.manual_seed(0)
    layer = TernaryMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8, requires_grad=True)
    pad = torch.tensor([[False, False, False, True], [False, False, False, False]])
    out, attn = layer(x, key_padding_mask=pad, is_causal=False)
    assert torch.all(attn[0, :, 3] == 0)  # padded key gets no attention
    out.sum().backward()
    assert layer.in_proj_weight.grad is not None and layer.in_proj_weight.grad.abs().sum() > 0
    assert x.grad is not None
    with pytest.raises(ValueError, match="embed_dim=8"):
        layer(x, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim=8"):
        TernaryMultiheadAttention(8, 2, kdim=6)


def test_state_dict_is_nn_multihead_attentions():
    mha = nn.MultiheadAttention(8, 2)
    layer = TernaryMultiheadAttention(8, 2)
    layer.load_state_dict(mha.state_dict())
    assert set(layer.state_dict()) == set(mha.state_dict())


def test_heatmap_png(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    torch.manual_seed(0)
    layer = TernaryMultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(RuntimeError, match="need_weights"):
        layer.save_attention_heatmap(tmp_path / "none.png")
    with torch.no_grad():
        layer(torch.randn(1, 6, 8))
    img = plt.imread(layer.save_attention_heatmap(tmp_path / "attn.png"))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    # A map from 0 (top-left) to 1 (bottom-right) shows the colormap's two ends.
    img = plt.imread(save_attention_heatmap(torch.linspace(0, 1, 16).reshape(4, 4), tmp_path / "ramp.png"))
    colors = {tuple((px[:3] * 255).round().astype(int)) for row in img for px in row}
    viridis = plt.get_cmap("viridis")
    for end in (0.0, 1.0):
        want = tuple((torch.tensor(viridis(end)[:3]) * 255).round().int().tolist())
        assert any(max(abs(a - b) for a, b in zip(c, want)) <= 2 for c in colors), end
    with pytest.raises(ValueError, match="2-D"):
        save_attention_heatmap(torch.rand(2, 2, 2), tmp_path / "x.png")
