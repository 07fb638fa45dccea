"""The inference fusions (norm + quant, linear epilogues) against the unfused graph."""

import re

import pytest
import torch

import bitcompile
from bitcompile.backend import _copy
from bitcompile.config import BitConfig
from bitcompile.passes import PassContext, run_passes
from tests.passes.fusion_models import Block, Epilogues

bitnet = torch.ops.bitnet


@pytest.fixture
def without_siblings(monkeypatch):
    from bitcompile.passes import manager

    monkeypatch.setattr(manager, "PASSES", tuple(p for p in manager.PASSES if p.name != "siblings"))


def rewritten_targets(model, *inputs, training=False, dynamic=None, **options):
    """The bitnet ops of the rewritten graph (passes run on Dynamo's graph, nothing compiled)."""
    graphs = []

    def capture(gm, example_inputs):
        ctx = PassContext(BitConfig.from_options(options), training=training)
        graphs.append(run_passes(_copy(gm), ctx))
        return gm.forward

    torch.compile(model, backend=capture, dynamic=dynamic)(*inputs)
    return [n.target for g in graphs for n in g.graph.nodes if str(n.target).startswith("bitnet.")]


def compiled_pair(model, *inputs):
    with torch.no_grad():
        fused = torch.compile(model, backend="bitnet")(*inputs)
        torch._dynamo.reset()
        unfused = torch.compile(model, backend="bitnet", options={"fuse": False})(*inputs)
    return fused, unfused


# The fused norm computes y = norm(h) in its own order of float operations; a one-ulp
# change of y can move an activation across a rounding boundary and change its int8
# code by 1, i.e. the output by at most s_x * s_w * (#flipped codes). At these sizes
# that stays below 1e-3 relative to the output's scale in fp32, 3% in bf16.
TOL = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_block_fuses_norms_residuals_and_epilogues(dtype):
    torch.manual_seed(0)
    model = Block().to(dtype).eval()
    x, r = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 5, 16, dtype=dtype)
    with torch.no_grad():
        targets = rewritten_targets(model, x, r)
    assert targets.count(bitnet.norm_quant.default) == 2  # one per norm, shared by q/k/v
    assert targets.count(bitnet.quantize_activations.default) == 1  # only `down`'s input is not a norm
    # q and k (both with a bias) are one sibling matmul; v (no bias), up and down their own
    assert targets.count(bitnet.linear_q.default) == 4 and bitnet.lowbit_linear.default not in targets
    fused, unfused = compiled_pair(model, x, r)
    torch.testing.assert_close(fused, unfused, **TOL[dtype])
    with torch.no_grad():
        report = bitcompile.explain(model, x, r)
    notes = {c.module: c.reason for c in report.candidates}
    assert "residual add + rms norm + int8 quant feeding 3 linear(s)" in notes["attn_norm"]
    # The second residual add was absorbed by `v`'s epilogue, so mlp_norm reads v's output.
    assert notes["mlp_norm"] == "fused: rms norm + int8 quant feeding 1 linear(s)"
    assert notes["v"].endswith("epilogue: residual add") and notes["up"].endswith("epilogue: silu")
    assert notes["down"].endswith("epilogue: residual add")


def test_epilogue_activations_and_stored_normalized_output(without_siblings):
    # The six linears read one input: without the sibling fusion, each keeps its own epilogue.
    torch.manual_seed(0)
    model, x = Epilogues().eval(), torch.randn(3, 12)
    with torch.no_grad():
        report = bitcompile.explain(model, x)
    notes = [c.reason for c in report.candidates]
    for act in ("relu", "gelu", "gelu_tanh", "silu", "relu2"):
        assert any(re.search(rf"epilogue: {act}( |$)", n) for n in notes), act
    assert any("epilogue: residual add" in n for n in notes)
    assert any("normalized output also stored" in n for n in notes)  # `n * 2` needs it
    fused, unfused = compiled_pair(model, x)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_training_graphs_fuse_norms_and_keep_the_ste_linears():
    model = Block()
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    targets = rewritten_targets(model, x, r, training=True)
    assert targets.count(bitnet.norm_quant.default) == 2 and bitnet.linear_q.default not in targets
    assert targets.count(bitnet.lowbit_linear.default) == 5  # the epilogue fusion is inference-only
    report = bitcompile.explain(model, x, r)
    assert (
        sum("normalized output also stored" in c.reason for c in report.candidates if c.op.endswith("+quant")) == 2
    ), str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qat_gradients_through_the_fused_norm_match_the_unfused_graph(dtype):
    # The fused training graph (norm_quant with its backward) against the unfused one
    # (Inductor's norm + quantize_activations): same loss, same gradients for the input, the
    # residual, the linear weights and the norm weights.
    torch.manual_seed(0)
    model = Block().to(dtype)
    x, r = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 5, 16, dtype=dtype)

    def grads(**options):
        torch._dynamo.reset()
        model.zero_grad()
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        out = torch.compile(model, backend="bitnet", options=options)(xs, rs)
        out.pow(2).mean().backward()
        return [out.detach(), xs.grad, rs.grad] + [p.grad.clone() for p in model.parameters()]

    for got, want in zip(grads(), grads(fuse=False)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_autocast_linears_share_one_cast_and_fuse_with_their_norm():
    # fp32 model under bf16 autocast (mixed-precision training): each linear's input is the fp32
    # norm output cast to bf16. q/k/v share that cast and one fused norm + quantization; the
    # fused graph's loss and gradients equal the unfused one's (bf16 activations: TOL[bf16]).
    torch.manual_seed(0)
    model = Block()
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = rewritten_targets(model, x, r, training=True)
    assert targets.count(bitnet.norm_quant.default) == 2  # one per norm, shared by its linears
    assert targets.count(bitnet.quantize_activations.default) == 1  # `down`'s input alone

    def grads(**options):
        torch._dynamo.reset()
        model.zero_grad()
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(model, backend="bitnet", options=options)(xs, rs)
        out.float().pow(2).mean().backward()
        return [out.detach(), xs.grad, rs.grad] + [p.grad.clone() for p in model.parameters()]

    for got, want in zip(grads(), grads(fuse=False)):
        torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


def test_a_linear_output_with_other_users_keeps_its_activation_outside():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y  # y has two users: relu cannot be absorbed

    model, x = Shared().eval(), torch.randn(2, 8)
    with torch.no_grad():
        report = bitcompile.explain(model, x)
    assert "epilogue" not in report.candidates[0].reason
    fused, unfused = compiled_pair(model, x)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


def test_fuse_false_keeps_the_plain_linear_path():
    model = Block().eval()
    with torch.no_grad():
        targets = rewritten_targets(model, torch.randn(1, 2, 16), torch.randn(1, 2, 16), fuse=False)
    assert bitnet.norm_quant.default not in targets and bitnet.linear_q.default not in targets


@pytest.mark.parametrize("deployed", [False, True])
def test_cuda_static_graphs_lower_to_inductor_visible_triton_ops(deployed, monkeypatch):
    # The lowering applies to CUDA graphs; here the device test is widened to the CPU so
    # the rewrite itself is checked without a GPU (the graph is inspected, not run).
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    model = Block().eval()
    if deployed:
        model = bitcompile.deploy(model)  # packed buffers: the same fusions and lowering
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        targets = rewritten_targets(model, x, r)
    assert targets.count(bitnet.norm_quant_triton.default) == 3  # two norms + `down`'s plain quantization
    assert bitnet.norm_quant.default not in targets and bitnet.quantize_activations.default not in targets
    assert targets.count(bitnet.linear_q_triton.default) == 4 and bitnet.linear_q.default not in targets  # q+k: one
    with torch.no_grad():  # symbolic row counts keep the run-time-dispatched ops
        torch._dynamo.reset()
        targets = rewritten_targets(model, x, r, dynamic=True)
    assert bitnet.linear_q_triton.default not in targets and targets.count(bitnet.linear_q.default) == 4


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_cuda_graphs_keep_opaque_calls_that_replays_skip(tokens, monkeypatch):
    # Under CUDA graphs a replay runs no Python: the activation quantizers stay opaque ops and the
    # linears become opaque calls on K-blocked weights (which can launch the Gluon matmul), at
    # every row count; nothing is traced into Inductor's code.
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    x, r = torch.randn(2, tokens, 16), torch.randn(2, tokens, 16)
    with torch.no_grad():
        targets = rewritten_targets(bitcompile.deploy(Block().eval()), x, r, mode="reduce-overhead")
    assert targets.count(bitnet.linear_q_kblocked.default) == 4 and bitnet.linear_q.default not in targets
    assert targets.count(bitnet.norm_quant.default) + targets.count(bitnet.quantize_activations.default) == 3
    assert not [t for t in targets if str(t).endswith("_triton.default")], targets


def test_cuda_static_training_graphs_lower_qat_ops_to_triton_twins(monkeypatch):
    # QAT on CUDA with static shapes: the weight quantizers, the linears and the activation
    # quantizers become the Triton twins (with autograd); widened to the CPU as above.
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    model = Block()
    x, r = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
    targets = rewritten_targets(model, x, r, training=True)
    assert targets.count(bitnet.lowbit_linear_triton.default) == 5 and bitnet.lowbit_linear.default not in targets
    # codes that feed lowered linears only: both layouts from one quantizer (no relayout in the matmul)
    assert targets.count(bitnet.quantize_weights_kblocked_triton.default) == 5
    assert bitnet.quantize_weights.default not in targets and bitnet.quantize_weights_triton.default not in targets
    assert targets.count(bitnet.norm_quant_triton.default) == 3 and bitnet.quantize_activations.default not in targets
    torch._dynamo.reset()  # int8 weights have no packed-code kernel: their linears stay opaque
    targets = rewritten_targets(model, x, r, training=True, weight="int8")
    assert bitnet.lowbit_linear_triton.default not in targets and targets.count(bitnet.lowbit_linear.default) == 5


def test_cuda_graphs_lower_linears_after_plain_quantizers(monkeypatch):
    # Linears whose inputs come from plain activation quantizers (no norm before them) lower
    # too (strict: a failing pass raises instead of falling back to the float graph).
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():
        targets = rewritten_targets(model, torch.randn(4, 32), mode="reduce-overhead", strict=True)
    assert targets.count(bitnet.linear_q_kblocked.default) == 2 and bitnet.linear_q.default not in targets


@pytest.fixture
def qat_block_lowered_on_cpu(monkeypatch):
    """``(lower_triton, (a seeded Block, x, r))`` with the lowering's device test widened to the CPU
    (where the twins' kernels are their references)."""
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    torch.manual_seed(0)
    return lower_triton, (Block(), torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16))


@pytest.mark.parametrize("grad_input_bits", [None, 8])
def test_lowered_qat_graph_computes_what_the_unlowered_graph_does(
    grad_input_bits, qat_block_lowered_on_cpu, monkeypatch
):
    # Every lowered call binds to its op's schema, the K-blocked codes included beside a keyword
    # grad_input_bits.
    lower_triton, (model, x, r) = qat_block_lowered_on_cpu
    outputs = {}

    def capture(gm, example_inputs):
        for lowered in (True, False):
            with monkeypatch.context() as patch:
                if not lowered:
                    patch.setattr(lower_triton, "lower_to_triton", lambda gm, ctx: None)
                ctx = PassContext(BitConfig.from_options({"grad_input_bits": grad_input_bits}), training=True)
                rewritten = run_passes(_copy(gm), ctx)
            outputs[lowered] = rewritten(*example_inputs)
            if lowered:
                assert bitnet.quantize_weights_kblocked_triton.default in [n.target for n in rewritten.graph.nodes]
        return gm.forward

    torch.compile(model, backend=capture)(x, r)
    for got, want in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(got, want)


def test_grouped_weight_pack_computes_what_one_pack_per_weight_does(qat_block_lowered_on_cpu, monkeypatch):
    # BITCOMPILE_GROUP_WEIGHT_PACK=1: the lowered training graph's five weight quantizers become one
    # grouped call after the inputs; its outputs and gradients equal the ungrouped graph's bit for bit.
    _, (model, x, r) = qat_block_lowered_on_cpu
    results = {}

    def capture(gm, example_inputs):
        for grouped in (True, False):
            monkeypatch.setenv("BITCOMPILE_GROUP_WEIGHT_PACK", "1" if grouped else "0")
            rewritten = run_passes(_copy(gm), PassContext(BitConfig(), training=True))
            targets = [n.target for n in rewritten.graph.nodes]
            calls = [n for n in rewritten.graph.nodes if n.target is bitnet.quantize_weights_group.default]
            if grouped:
                assert len(calls) == 1 and len(calls[0].args[0]) == 5, targets
                assert bitnet.quantize_weights_kblocked_triton.default not in targets
            else:
                assert not calls and targets.count(bitnet.quantize_weights_kblocked_triton.default) == 5
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in example_inputs]
            out = rewritten(*inputs)
            grads = torch.autograd.grad([o.sum() for o in out], [t for t in inputs if t.requires_grad])
            results[grouped] = (out, grads)
        return gm.forward

    torch.compile(model, backend=capture)(x, r)
    for got, want in zip(results[True], results[False], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def _static(*nodes):
    from bitcompile.passes.graph import meta

    tensors = [meta(n) for n in nodes if isinstance(n, torch.fx.Node)]
    return bool(tensors) and all(t is not None and all(isinstance(d, int) for d in t.shape) for t in tensors)
