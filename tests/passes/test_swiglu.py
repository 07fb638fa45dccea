"""SwiGLU's product in the fused gate+up matmul's epilogue (inference), against the unfused graph."""

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.numerics import reference as ref
from bitcompile.ops import WEIGHT_CACHE
from tests.passes.fusion_models import Attention
from tests.passes.test_fusion import TOL, _static, rewritten_targets
from tests.passes.test_gated_quant import ProductAlsoReturned

bitnet = torch.ops.bitnet
NOTE = "epilogue: silu(gate) * up (gate and up rows interleaved)"


@pytest.fixture(autouse=True)
def swiglu_on(monkeypatch):
    """The fusion is opt-in (``BITCOMPILE_SWIGLU=1``)."""
    monkeypatch.setenv("BITCOMPILE_SWIGLU", "1")


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("BITCOMPILE_SWIGLU")
    assert "swiglu" not in linear_activations(MLP().eval(), torch.randn(1, 32), exclude=[])


class MLP(nn.Module):
    """A Llama MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int = 32, intermediate: int = 48):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, intermediate, bias=False), nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def without_swiglu(monkeypatch):
    from bitcompile.passes import manager

    monkeypatch.setattr(manager, "PASSES", tuple(p for p in manager.PASSES if p.name != "swiglu"))


def linear_activations(model, x, **options) -> list:
    """The activation argument of every ``linear_q`` of the rewritten graph."""
    from bitcompile.backend import _copy
    from bitcompile.config import BitConfig
    from bitcompile.passes import PassContext, run_passes

    seen = []

    def capture(gm, example_inputs):
        g = run_passes(_copy(gm), PassContext(BitConfig.from_options(options), training=False))
        seen.extend(n.args[7] for n in g.graph.nodes if n.target is bitnet.linear_q.default)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(x)
    return seen


@pytest.mark.parametrize("deployed", [False, True])
@pytest.mark.parametrize("model_cls", [MLP, lambda: Attention(bias=False)], ids=["mlp", "biased_mlp"])
def test_gate_up_matmul_computes_the_product(model_cls, deployed, monkeypatch):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(1, 70, 32)  # rows outside 2-64 (see test_not_fused_at_the_gluon_kernels_rows)
    if deployed:
        model = bitcompile.deploy(model, exclude=[])
    assert linear_activations(model, x, exclude=[]).count("swiglu") == 1
    with torch.no_grad():
        targets = rewritten_targets(model, x, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        notes = {c.module: c.reason for c in bitcompile.report.LAST.rewritten}
        torch._dynamo.reset()
        without_swiglu(monkeypatch)
        unfused = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
    assert torch.narrow not in targets and targets.count(bitnet.linear_q.default) in (2, 3)  # (q+k+v,) gate+up, down
    assert notes["gate"].endswith(NOTE) and notes["up"].endswith(NOTE)
    torch.testing.assert_close(got, unfused, **TOL[torch.float32])


def test_bf16_within_the_fusions_tolerance(monkeypatch):
    # The epilogue computes silu(gate) * up from fp32 gate and up and rounds once; the unfused
    # graph rounds gate, up, silu(gate) and the product to bf16 (TOL's note on code flips).
    torch.manual_seed(0)
    model, x = MLP().bfloat16().eval(), torch.randn(3, 30, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        torch._dynamo.reset()
        without_swiglu(monkeypatch)
        unfused = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
    torch.testing.assert_close(got, unfused, **TOL[torch.bfloat16])


def test_not_fused_where_the_product_or_a_half_is_read_elsewhere():
    class HalfReturned(MLP):
        def forward(self, x):
            up = self.up(x)
            return self.down(nn.functional.silu(self.gate(x)) * up), up

    torch.manual_seed(0)
    assert "swiglu" not in linear_activations(ProductAlsoReturned().eval(), torch.randn(1, 16))
    assert "swiglu" not in linear_activations(HalfReturned().eval(), torch.randn(1, 32), exclude=[])


@pytest.mark.parametrize("rows, fused", [(1, True), (2, False), (64, False), (65, True)])
def test_not_fused_at_the_gluon_kernels_rows(rows, fused):
    # The Gluon kernel (2-64 rows) has no swiglu epilogue: there the product stays Inductor's
    assert ("swiglu" in linear_activations(MLP().eval(), torch.randn(rows, 32), exclude=[])) == fused


def test_training_graphs_and_the_opt_in_gated_quantization_keep_their_own_forms(monkeypatch):
    model, x = MLP(), torch.randn(1, 32)
    assert bitnet.linear_q.default not in rewritten_targets(model, x, training=True, exclude=[])
    monkeypatch.setenv("BITCOMPILE_GATED_QUANT", "1")  # it claims the product first
    targets = rewritten_targets(model.eval(), x, exclude=[])
    assert bitnet.gated_quant.default in targets and "swiglu" not in linear_activations(model, x, exclude=[])


def test_weight_cache_interleaves_members_rows():
    torch.manual_seed(0)
    gate, up = torch.randn(6, 40), torch.randn(6, 40)
    stacked = WEIGHT_CACHE.get_group([gate, up], "ternary", False)
    interleaved = WEIGHT_CACHE.get_group([gate, up], "ternary", False, interleave=True)
    for got, want in zip(interleaved, stacked):
        assert torch.equal(got, ref.interleave_rows(want[:6], want[6:]))
    codes = [WEIGHT_CACHE.get(w, "ternary", False) for w in (gate, up)]
    deployed = WEIGHT_CACHE.get_prepacked([c for c, _ in codes], [s for _, s in codes], 40, interleave=True)
    for got, want in zip(deployed, interleaved):
        assert torch.equal(got, want)


def test_lowered_like_every_inference_linear(monkeypatch):
    # The lowering's device test widened to the CPU (as in test_fusion.py): the Triton twin without
    # CUDA graphs, the opaque K-blocked op under them; the activation travels along.
    from bitcompile.ops.epilogue import twin_linear_q
    from bitcompile.passes import lower_triton

    monkeypatch.setattr(lower_triton, "_static_cuda", lambda *nodes: _static(*nodes))
    model, x = MLP().eval(), torch.randn(1, 1, 32)
    with torch.no_grad():
        plain = rewritten_targets(model, x, exclude=[])
        torch._dynamo.reset()
        graphed = rewritten_targets(model, x, exclude=[], mode="reduce-overhead")
    assert plain.count(twin_linear_q()) == 2 and graphed.count(bitnet.linear_q_kblocked.default) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 300])  # the GEMV; the GEMM
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_on_cuda_against_the_unfused_graph(rows, mode, monkeypatch):
    torch.manual_seed(0)
    model = MLP(256, 688).cuda().bfloat16().eval()  # gate + up: 1376 interleaved rows
    x = torch.randn(1, rows, 256, device="cuda", dtype=torch.bfloat16)
    options = {"exclude": [], **({"mode": mode} if mode else {})}
    with torch.no_grad():
        got = [torch.compile(model, backend="bitnet", options=options)(x).clone() for _ in range(2)]
        notes = {c.module: c.reason for c in bitcompile.report.LAST.rewritten}
        torch._dynamo.reset()
        without_swiglu(monkeypatch)
        unfused = torch.compile(model, backend="bitnet", options=options)(x)
    assert notes["gate"].endswith(NOTE), notes["gate"]
    for out in got:
        torch.testing.assert_close(out, unfused, **TOL[torch.bfloat16])
