"""Constant causal masks become ``is_causal`` (GQA's K/V copies go): the masked graph's result."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
from bitcompile.passes import manager
from tests.models.zoo import llama


def compiled(model, *args, rewrite=True, monkeypatch=None, **kwargs):
    torch._dynamo.reset()
    if not rewrite:
        monkeypatch.setattr(manager, "PASSES", tuple(p for p in manager.PASSES if p.name != "causal_mask"))
    out = torch.compile(model, backend="bitnet")(*args, **kwargs)
    if not rewrite:
        monkeypatch.undo()
    notes = [c.reason for c in bitcompile.report.LAST.candidates if c.op == "attention"]
    return out, notes


GQA_NOTE = "float; constant causal mask -> is_causal, grouped-query: 2 query heads per K/V head, K/V not expanded"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_prefill_without_padding_runs_causal_attention_on_the_kv_heads(device, monkeypatch):
    """transformers builds the causal mask under compile; it reads no input, so it is evaluated,
    found causal, and the attention runs as ``is_causal`` on the 2 K/V heads."""
    torch.manual_seed(0)
    model = llama()[0].eval().to(device)
    ids = torch.randint(1, 60, (2, 12), device=device)
    with torch.no_grad():
        got, notes = compiled(model, ids)
        want, none = compiled(model, ids, rewrite=False, monkeypatch=monkeypatch)
    assert notes == [GQA_NOTE, GQA_NOTE] and not none
    # The same rows over the same keys, another attention kernel: fp32 round-off
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_a_padded_batch_keeps_its_mask():
    torch.manual_seed(0)
    model = llama()[0].eval()
    ids = torch.randint(1, 60, (2, 12))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[0, :3] = 0  # left padding: the mask now depends on an input
    with torch.no_grad():
        _, notes = compiled(model, ids, attention_mask=padding)
    assert notes == []


def test_training_gradients_match_the_masked_graph(monkeypatch):
    torch.manual_seed(0)
    model = llama()[0].train()
    ids = torch.randint(1, 60, (2, 12))
    grads = []
    for rewrite in (True, False):
        model.zero_grad()
        out, notes = compiled(model, ids, labels=ids, rewrite=rewrite, monkeypatch=monkeypatch)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert bool(notes) == rewrite
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ConstantMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        keep = {"causal": i[None, :] <= i[:, None], "band": (i[:, None] - i[None, :]).abs() <= 1}[self.mask]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("mask, rewritten", [("causal", True), ("band", False)])
def test_only_the_causal_pattern_is_rewritten(mask, rewritten):
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    with torch.no_grad():
        got, notes = compiled(ConstantMask(mask), q, k, v)
        want = ConstantMask(mask)(q, k, v)
    assert notes == (["float; constant causal mask -> is_causal"] if rewritten else [])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class RandomMask(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        keep = torch.ones(n, n, dtype=torch.bool).tril() | (torch.rand(n, n) < 0.0)  # causal, but drawn
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_a_mask_with_a_random_draw_is_not_evaluated():
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    with torch.no_grad():
        _, notes = compiled(RandomMask(), q, k, v)
    assert notes == []


class RepeatedKV(nn.Module):
    """transformers' masked GQA call: K/V copied per query head (``repeat_kv``) beside a mask."""

    def forward(self, q, k, v):
        (b, h, n, d), hkv = q.shape, k.shape[1]
        i = torch.arange(n)
        k, v = (t[:, :, None, :, :].expand(b, hkv, h // hkv, n, d).reshape(b, h, n, d) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])


@pytest.mark.parametrize("head_dim, grouped", [(64, True), (320, False)])
def test_kv_heads_stay_copied_where_the_fused_kernels_take_no_gqa(head_dim, grouped):
    """Past a head dim of 256 SDPA would run its math kernel on un-expanded K/V heads: the call
    becomes causal, and keeps the copies."""
    q, k, v = torch.randn(1, 4, 5, head_dim), torch.randn(1, 2, 5, head_dim), torch.randn(1, 2, 5, head_dim)
    with torch.no_grad():
        got, notes = compiled(RepeatedKV(), q, k, v)
        want = RepeatedKV()(q, k, v)
    grouped_note = ", grouped-query: 2 query heads per K/V head, K/V not expanded"
    assert notes == ["float; constant causal mask -> is_causal" + (grouped_note if grouped else "")]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
