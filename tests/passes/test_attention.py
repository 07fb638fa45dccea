"""Attention: int attention matmuls (op, SDPA and manual spellings), nn.MultiheadAttention
projections (fused QKV, cross-attention), compiled == eager reference twin."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bitcompile
from bitcompile.nn.reference_model import reference_model
from bitcompile.numerics import reference as ref
from bitcompile.ops import attention as bit_attention
from tests.helpers import EXACT


@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 16), st.integers(1, 9), st.integers(2, 8)
)
def test_quantized_attention_matmul_is_exact_int_with_per_head_scales(b, h, m, k, n, bits):
    torch.manual_seed(b * 1000 + h * 100 + m)
    x, y = torch.randn(b, h, m, k) * 4, torch.randn(b, h, k, n)
    got = torch.ops.bitnet.quantized_attention_matmul(x, y, bits)
    qx, sx = ref.quantize_per_head(x, bits)
    qy, sy = ref.quantize_per_head(y, bits)
    assert sx.shape == (b, h, 1, 1) and qx.int().abs().max() <= 2 ** (bits - 1)  # int8 cannot hold 128
    acc = torch.einsum("bhmk,bhkn->bhmn", qx.long(), qy.long())  # integer oracle
    torch.testing.assert_close(got, (acc.float() * sx * sy), rtol=1e-6, atol=0)


def test_quantized_attention_matmul_ste_grads_and_opcheck():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 5, requires_grad=True)
    b = torch.randn(1, 3, 5, 6, requires_grad=True)  # broadcast over batch, as k for GQA-style use
    out = torch.ops.bitnet.quantized_attention_matmul(a, b, 8)
    qa, sa = ref.quantize_per_head(a.detach())
    qb, sb = ref.quantize_per_head(b.detach())
    ad, bd = (qa.float() * sa).requires_grad_(), (qb.float() * sb).requires_grad_()
    want = ad @ bd
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g), want.backward(g)
    torch.testing.assert_close(a.grad, ad.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, bd.grad, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(
        torch.ops.bitnet.quantized_attention_matmul,
        (torch.randn(2, 2, 3, 4, requires_grad=True), torch.randn(2, 2, 4, 3), 8),
    )


def test_quantized_sdpa_is_close_to_float_sdpa():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    mask = torch.rand(7, 7) > 0.2
    mask.fill_diagonal_(True)
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask), dict(attn_mask=torch.randn(7, 7)), dict(scale=0.3)):
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        got = bit_attention.quantized_sdpa(q, k, v, **kwargs, attention_bits=8)
        # int8 per-head quantization of q, k, p, v: ~1% relative error of the output
        assert (got - want).norm() / want.norm() < 0.03, kwargs
    kv = torch.randn(2, 2, 7, 8)  # grouped-query attention
    want = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    got = bit_attention.quantized_sdpa(q, kv, kv, enable_gqa=True, attention_bits=8)
    assert (got - want).norm() / want.norm() < 0.03


class ManualAttention(nn.Module):
    """Separate q/k/v/o projections, manual softmax(q k^T * scale + mask) v, and an SDPA call."""

    def __init__(self, d=16, heads=2, reference_bits=None):
        super().__init__()
        self.h, self.bits = heads, reference_bits
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, t):
        b, s, d = t.shape
        return t.view(b, s, self.h, d // self.h).transpose(1, 2)

    def forward(self, x, mem):
        q, k, v = self.split(self.q(x)), self.split(self.k(mem)), self.split(self.v(mem))  # cross-attention
        mask = torch.zeros(x.shape[1], mem.shape[1])
        mask[:, -1] = float("-inf")
        mm = (lambda a, b: bit_attention.attention_matmul(a, b, self.bits)) if self.bits else torch.matmul
        scores = mm(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])) + mask
        out = mm(torch.softmax(scores, dim=-1), v)
        if self.bits:
            out = out + bit_attention.quantized_sdpa(q, k, v, attention_bits=self.bits)
        else:
            out = out + F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("grad", [False, True])
def test_manual_and_sdpa_attention_matmuls_quantized_when_asked(grad):
    torch.manual_seed(2)
    model = ManualAttention()
    twin = reference_model(model, exclude=[]).model
    twin.bits = 8  # the twin spells the attention matmuls with the reference quantized ops
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    with torch.set_grad_enabled(grad):
        report = bitcompile.explain(model, x, mem, attention_bits=8, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"attention_bits": 8, "exclude": []})(x, mem)
        want = twin(x, mem)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # Inductor-fused softmax/mask/scale
    ops = [(c.op, c.rewritten) for c in report.candidates]
    assert ops.count(("linear", True)) == 4 and ops.count(("attention_matmul", True)) == 2, str(report)
    if grad:
        got.sum().backward()
        want.sum().backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_attention_matmuls_stay_float_by_default_and_non_attention_softmax_is_reported():
    class SoftmaxOnly(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-2, -1), -1).sum(-1)  # no attn @ V

    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert bitcompile.explain(SoftmaxOnly(), x).candidates == []
        r = bitcompile.explain(SoftmaxOnly(), x, attention_bits=8)
    assert (
        len(r.candidates) == 1
        and not r.candidates[0].rewritten
        and "not an attention pattern" in r.candidates[0].reason
    )
    assert r.candidates[0].module == "softmax"  # the root module called it: the node name stands in


class MHABlock(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x, mem, key_padding_mask):
        y, weights = self.self_attn(
            x,
            x,
            x,
            attn_mask=torch.ones(
                x.shape[1 if self.self_attn.batch_first else 0],
                x.shape[1 if self.self_attn.batch_first else 0],
                dtype=torch.bool,
            ).triu(1),
        )
        z, _ = self.cross(y, mem, mem, key_padding_mask=key_padding_mask, need_weights=False)
        return z, weights


@pytest.mark.parametrize("batch_first,attention_bits", [(True, None), (False, 8)])
def test_multihead_attention_projections_match_reference(batch_first, attention_bits):
    torch.manual_seed(3)
    model = MHABlock(batch_first)
    opts = {"attention_bits": attention_bits}
    twin = reference_model(model, **opts)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, -3:] = True
    compiled = torch.compile(model, backend="bitnet", options=opts)
    for grad in (True, False):
        model.train(grad), twin.train(grad)
        with torch.set_grad_enabled(grad):
            got, want = compiled(x, mem, kpm), twin(x, mem, kpm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        report = bitcompile.explain(model, x, mem, kpm, **opts)
    rows = {(c.op, c.module): c for c in report.candidates}
    for m in ("self_attn", "cross"):
        assert rows[("linear", m)].rewritten and "in_proj" in rows[("linear", m)].reason
        assert rows[("linear", f"{m}.out_proj")].rewritten and rows[("attention", m)].rewritten
    assert report.graph_breaks == 0


def test_projection_of_a_transposed_sequence_first_input():
    """Seq-first attention code projects transposed activations: the activation quantizer
    must return the contiguous layout its fake kernel promises."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 6))  # reference_model swaps children, not the root
    x = torch.randn(5, 2, 8).transpose(0, 1)
    for grad in (False, True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
            want = reference_model(model, exclude=[])(x)
        torch.testing.assert_close(got, want, **EXACT)
