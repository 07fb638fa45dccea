"""Real model code, unchanged, through the backend (tiny random-init configs, no downloads).

For each model: every eligible layer is rewritten (embeddings and lm_head stay float),
no more graph breaks than plain torch.compile, compiled == eager reference twin, new batch
sizes / lengths reuse one dynamic graph, a few QAT steps reduce the loss, and eval after
training still matches the (new) twin.
"""

import pytest
import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.nn.reference_model import reference_model
from bitcompile.report import collecting
from tests.models.zoo import MODELS, call, output_tensor

pytest.importorskip("transformers")

# The compiled graph runs the same bitnet ops as the twin on the same integers; only the
# float glue (norms, softmax, GELU, residuals) is fused by Inductor and can differ by ulps,
# which can flip an isolated activation rounding. Relative error of the whole output:
REL_TOL = 1e-4
# (batch, seq) per call; images use "seq" as the side (ViT keeps 16: fixed position table).
SHAPES = {"vit": [(2, 16), (3, 16), (5, 16)], "resnet": [(2, 16), (3, 12), (4, 20)]}
DEFAULT_SHAPES = [(2, 8), (3, 12), (4, 10)]
QUANTIZED_OPS = ("linear", "conv1d", "conv2d")


def eligible_layers(model: nn.Module, cfg: BitConfig) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = set()
    for path, m in model.named_modules():
        if type(m) in (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d) and not cfg.excluded(path) and id(m.weight) not in tied:
            if not (isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels):
                out.add(path)
        if type(m) is nn.MultiheadAttention:
            out |= {path, f"{path}.out_proj"}
    return out


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model(name):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, make_inputs, loss_fn = MODELS[name]()
    shapes = SHAPES.get(name, DEFAULT_SHAPES)
    inputs = [make_inputs(b, s) for b, s in shapes]
    compiled = torch.compile(model, backend="bitnet")

    # Inference: report, graph breaks, match, dynamic shapes.
    model.eval()
    plain_breaks = torch._dynamo.explain(model)(
        **{k: v for k, v in inputs[0].items() if k != "labels"}
    ).graph_break_count
    torch._dynamo.reset()
    counters.clear()
    twin = reference_model(model)
    with torch.no_grad(), collecting() as report:
        for x in inputs:
            got, want = output_tensor(call(compiled, x)), output_tensor(call(twin, x))
            assert rel_err(got, want) < REL_TOL, (name, x.keys())
    assert sum(counters["graph_break"].values()) <= plain_breaks, str(report)
    assert counters["stats"]["unique_graphs"] <= 2 + plain_breaks, "recompiled per batch/length"
    rewritten = {c.module for c in report.candidates if c.rewritten and c.op in QUANTIZED_OPS}
    assert rewritten == eligible_layers(model, BitConfig()), str(report)
    embeddings = {p for p, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert not rewritten & embeddings and not any(m.endswith("lm_head") for m in rewritten)

    # QAT: a few steps on one batch lower the loss; eval still matches the new twin.
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = loss_fn(call(compiled, inputs[0]), inputs[0])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    twin = reference_model(model)
    with torch.no_grad():
        got, want = output_tensor(call(compiled, inputs[1])), output_tensor(call(twin, inputs[1]))
    assert rel_err(got, want) < REL_TOL


def test_llama_int8_attention_matmuls_match_reference():
    """attention_bits=8 on real model code: both SDPA matmuls per layer become int8 x int8
    (reported with the attention module's path); the twin runs the same quantized SDPA."""
    torch.manual_seed(1)
    model, make_inputs, _ = MODELS["llama"]()
    model.eval()
    x = make_inputs(2, 8)
    with torch.no_grad(), collecting() as report:
        got = output_tensor(call(torch.compile(model, backend="bitnet", options={"attention_bits": 8}), x))
        want = output_tensor(call(reference_model(model, attention_bits=8), x))
        float_attention = output_tensor(call(reference_model(model), x))
    assert rel_err(got, want) < REL_TOL
    assert rel_err(got, float_attention) > 1e-5  # the option changed the numerics
    attn = [c.module for c in report.candidates if c.op == "attention_matmul" and c.rewritten]
    assert attn == ["model.layers.0.self_attn", "model.layers.1.self_attn"], str(report)


def test_llama_eager_attention_manual_spelling_is_quantized():
    """transformers' eager attention (matmul * scaling + mask, softmax(dtype=float32).to,
    dropout, matmul) is the manual spelling: both matmuls per layer become int8 x int8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), collecting() as report:
        got = torch.compile(model, backend="bitnet", options={"attention_bits": 8})(input_ids=ids).logits
        float_attention = reference_model(model)(input_ids=ids).logits
    attn = [c.module for c in report.candidates if c.op == "attention_matmul" and c.rewritten]
    assert attn == ["model.layers.0.self_attn", "model.layers.1.self_attn"], str(report)
    # int8 per-head q, k, p, v: about 1% relative error against float attention matmuls
    assert 1e-5 < rel_err(got, float_attention) < 0.03
