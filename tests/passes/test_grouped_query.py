"""Grouped-query attention folded (K/V heads read once, not expanded): the unfolded graph's result."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
from bitcompile.passes import manager


class GroupedAttention(nn.Module):
    """transformers' spelling: ``repeat_kv`` on K and V, then SDPA with an explicit mask."""

    def __init__(self, heads=4, kv_heads=2, dim=8, is_causal=False, dim_v=None):
        super().__init__()
        self.groups, self.is_causal = heads // kv_heads, is_causal
        self.proj = nn.Linear((dim_v or dim) * heads, dim * heads)

    def forward(self, q, k, v, mask):
        b, hkv, s, d = k.shape
        k = k[:, :, None, :, :].expand(b, hkv, self.groups, s, d).reshape(b, hkv * self.groups, s, d)
        dv = v.shape[-1]
        v = v[:, :, None, :, :].expand(b, hkv, self.groups, s, dv).reshape(b, hkv * self.groups, s, dv)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.3, is_causal=self.is_causal
        )
        return self.proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


def inputs(
    batch=2, length=1, keys=6, heads=4, kv_heads=2, dim=8, mask_rows=1, device="cpu", dtype=torch.float32, dim_v=None
):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g)
    v = torch.randn(batch, kv_heads, keys, dim_v or dim, generator=g)
    mask = torch.rand(batch, 1, mask_rows, keys, generator=g) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    return tuple(t.to(device, dtype if t.is_floating_point() else t.dtype) for t in (q, k, v, mask))


def compiled(model, args, fold=True, monkeypatch=None):
    torch._dynamo.reset()
    if not fold:
        monkeypatch.setattr(manager, "PASSES", tuple(p for p in manager.PASSES if p.name != "grouped_query"))
    with torch.no_grad():
        out = torch.compile(model, backend="bitnet", options={"exclude": ["proj"]})(*args)
    if not fold:
        monkeypatch.undo()
    folds = [c for c in bitcompile.report.LAST.candidates if c.op == "attention"]
    return out, folds


CASES = [
    pytest.param("cpu", 1, 4, 2, 8, None, id="cpu-decode"),
    pytest.param("cpu", 3, 4, 2, 8, None, id="cpu-3-rows"),
    pytest.param("cpu", 1, 6, 2, 8, 4, id="cpu-value-heads-of-another-size"),
    # Llama 3 8B's attention (32 query heads on 8 K/V heads), bf16, what the H100 decode runs
    pytest.param("cuda", 1, 32, 8, 128, None, id="cuda-llama3", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device, length, heads, kv_heads, dim, dim_v", CASES)
def test_folded_attention_gives_the_expanded_result(device, length, heads, kv_heads, dim, dim_v, monkeypatch):
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = GroupedAttention(heads, kv_heads, dim, dim_v=dim_v).eval().to(device, dtype)
    shapes = dict(heads=heads, kv_heads=kv_heads, dim=dim, dim_v=dim_v)
    args = inputs(length=length, keys=37, **shapes, device=device, dtype=dtype)
    folded, folds = compiled(model, args)
    unfolded, none = compiled(model, args, fold=False, monkeypatch=monkeypatch)
    groups = heads // kv_heads
    assert folded.shape == (2, length, dim * heads)
    assert [c.reason for c in folds] == [f"float; grouped-query: {groups} query heads per K/V head, K/V not expanded"]
    assert folds[0].shape == f"q[2, {heads}, {length}, {dim}], k/v[2, {kv_heads}, 37, {dim}]" and not none
    # Each row sums the same keys in the same order: fp32 on the CPU agrees to the last places of
    # a sum; bf16 on CUDA to one bf16 step of the output (the attention kernel may tile G*L
    # query rows differently from L, and rounds its output to bf16)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(folded, unfolded, **tol)


@pytest.mark.parametrize(
    "case",
    ["causal", "per_row_mask", "training"],
)
def test_calls_the_fold_cannot_take_keep_their_expansion(case):
    model = GroupedAttention(is_causal=case == "causal")
    args = inputs(length=3, mask_rows=3 if case == "per_row_mask" else 1)
    if case == "causal":
        args = (*args[:3], None)
    torch._dynamo.reset()
    with torch.set_grad_enabled(case == "training"):
        out = torch.compile(model, backend="bitnet", options={"exclude": ["proj"]})(*args)
    assert not [c for c in bitcompile.report.LAST.candidates if c.op == "attention"]
    torch.testing.assert_close(out, model(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_static_cache_decode_folds_every_layer_and_keeps_the_twins_tokens():
    """Greedy decoding with transformers' static cache (whose mask makes the model expand K/V)."""
    from transformers import StaticCache

    from tests.models.zoo import llama

    torch.manual_seed(0)
    model, make_inputs, _ = llama()
    model.generation_config.eos_token_id = None
    model.eval()
    twin = bitcompile.nn.reference_model(model).model
    deployed = bitcompile.deploy(copy.deepcopy(model))
    bitcompile.compile(deployed)
    prompt = make_inputs(1, 8)["input_ids"]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.25 renamed it

    def greedy(m):
        return m.generate(
            prompt,
            max_new_tokens=16,
            do_sample=False,
            use_cache=True,
            **{name: StaticCache(config=model.config, max_cache_len=32)},
        )

    with torch.no_grad():
        got, want = greedy(deployed), greedy(twin)
    assert torch.equal(got, want)
    folded = {layer.module for layer in bitcompile.report_of(deployed).layers if layer.op == "attention"}
    assert folded == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
