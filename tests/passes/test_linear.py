"""The linear pass through the whole backend: compiled == eager reference, grads == STE."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bitcompile
from bitcompile.backend import BitcompileFallbackWarning
from bitcompile.report import collecting
from tests.helpers import EXACT, MLP, swap_to_bitlinear


class Functional(nn.Module):
    """F.linear on parameters, one call without bias, extra leading dims."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6))
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), weight=self.w2)


def test_module_linears_match_eager_reference_and_report_paths():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 3, 12)
    twin = swap_to_bitlinear(model)
    compiled = torch.compile(model, backend="bitnet")
    torch.testing.assert_close(compiled(x), twin(x), **EXACT)
    report = bitcompile.report.LAST
    assert [(c.module, c.rewritten) for c in report.candidates] == [("fc1", True), ("fc2", True), ("lm_head", False)]
    assert "excluded by pattern 'lm_head'" in report.candidates[2].reason


def _passes_args_through(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class WrappedForwardMLP(MLP):
    """forward behind a ``*args`` decorator (as transformers >= 5.24 does): Dynamo then names the
    module ``L['args'][0]`` instead of ``L['self']``."""

    forward = _passes_args_through(MLP.forward)


def test_report_paths_hold_when_forward_is_wrapped():
    torch.manual_seed(0)
    model, x = WrappedForwardMLP(), torch.randn(2, 12)
    torch.testing.assert_close(torch.compile(model, backend="bitnet")(x), swap_to_bitlinear(model)(x), **EXACT)
    report = bitcompile.report.LAST
    assert [(c.module, c.rewritten) for c in report.candidates] == [("fc1", True), ("fc2", True), ("lm_head", False)]


def test_functional_linear_spelling_is_rewritten():
    torch.manual_seed(0)
    model, x = Functional(), torch.randn(5, 2, 6)
    report = bitcompile.explain(model, x)
    assert [c.rewritten for c in report.candidates] == [True, True]
    w1q, s1 = bitcompile.numerics.reference.quantize_weights(model.w1.detach())
    w2q, s2 = bitcompile.numerics.reference.quantize_weights(model.w2.detach())
    ops = torch.ops.bitnet
    h = ops.lowbit_linear(x, model.w1, model.b1, *ops.quantize_activations(x, 8), w1q, s1).relu()
    expect = ops.lowbit_linear(h, model.w2, None, *ops.quantize_activations(h, 8), w2q, s2)
    torch.testing.assert_close(torch.compile(model, backend="bitnet")(x), expect, **EXACT)


def test_training_gradients_equal_eager_reference():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 12)
    twin = swap_to_bitlinear(model)
    torch.compile(model, backend="bitnet")(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_grad_input_bits_option_quantizes_the_output_gradient():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 12)
    twins = {bits: swap_to_bitlinear(model, grad_input_bits=bits) for bits in (None, 8)}
    compiled = torch.compile(model, backend="bitnet", options={"grad_input_bits": 8})
    xs = {name: x.clone().requires_grad_() for name in ("compiled", None, 8)}
    with collecting() as report:
        compiled(xs["compiled"]).square().sum().backward()
    for bits, twin in twins.items():
        twin(xs[bits]).square().sum().backward()
    torch.testing.assert_close(xs["compiled"].grad, xs[8].grad, rtol=0, atol=0)
    assert not torch.equal(xs[8].grad, xs[None].grad)  # the option is in effect: not the exact STE gradient
    for (name, p), q in zip(model.named_parameters(), twins[8].parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    notes = [c.reason for c in report.candidates if c.rewritten]
    assert notes and all("int8 output grads for the input gradient" in r for r in notes)


@settings(max_examples=6)
@given(batch=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 1000))
def test_dynamic_shapes_match_reference(batch, seed):
    torch.manual_seed(seed)
    model = MLP(d_in=7, d_hidden=9, d_out=3)  # K=7, 9: not multiples of 4
    x = torch.randn(*batch, 7)
    out = torch.compile(model, backend="bitnet", dynamic=True)(x)
    torch.testing.assert_close(out, swap_to_bitlinear(model)(x), **EXACT)


@pytest.mark.parametrize(
    "options,expect",
    [
        ({"weight": "binary"}, "binary W (per-tensor), A8"),
        ({"weight": "int8", "activation_bits": None}, "int8 W (per-channel), A-float"),
        ({"granularity": "per_channel", "activation_bits": 4}, "ternary W (per-channel), A4"),
    ],
)
def test_options_select_the_quantizer(options, expect):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 12)
    twin_options = {k: v for k, v in options.items()}
    report = bitcompile.explain(model, x, **options)
    assert report.candidates[0].reason == expect
    out = torch.compile(model, backend="bitnet", options=options)(x)
    torch.testing.assert_close(out, swap_to_bitlinear(model, **twin_options)(x), **EXACT)


def test_exclude_globs_match_paths_and_suffixes():
    model, x = MLP(), torch.randn(2, 12)
    report = bitcompile.explain(model, x, exclude=["fc*"])
    assert [c.rewritten for c in report.candidates] == [False, False, True]
    report = bitcompile.explain(nn.Sequential(model), x, exclude=["lm_head"])  # matches "0.lm_head"
    assert [c.module for c in report.skipped] == ["0.lm_head"]


def test_unknown_or_invalid_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown bitnet option.*'wieght'.*valid options: weight"):
        bitcompile.explain(MLP(), torch.randn(2, 12), wieght="ternary")
    with pytest.raises(ValueError, match="invalid weight='quaternary'; valid choices: 'ternary', 'binary', 'int8'"):
        bitcompile.BitConfig(weight="quaternary")
    with pytest.raises(ValueError, match="activation_bits"):
        bitcompile.BitConfig(activation_bits=16)
    with pytest.raises(ValueError, match="grad_input_bits must be an int in 2..8"):
        bitcompile.BitConfig(grad_input_bits=1)


def test_graph_breaks_and_graphs_are_counted():
    class Broken(MLP):
        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            return self.fc2(h)

    report = bitcompile.explain(Broken(), torch.randn(2, 12))
    assert report.graphs == 2 and report.graph_breaks == 1
    assert [(c.graph, c.module) for c in report.candidates] == [(0, "fc1"), (1, "fc2")]
    assert "2 graph(s), 1 graph break(s)" in str(report)


def test_unsupported_inputs_are_left_to_inductor_with_a_reason():
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.complex64):
        model, x = nn.Linear(6, 4, dtype=dtype), torch.randn(3, 6, dtype=dtype)
        report = bitcompile.explain(model, x)
        assert not report.candidates[0].rewritten and "unsupported dtype" in report.candidates[0].reason
        torch.testing.assert_close(torch.compile(model, backend="bitnet")(x), model(x))
    meta = bitcompile.explain(nn.Linear(6, 4, device="meta"), torch.randn(2, 6, device="meta"))
    assert "unsupported device meta" in meta.candidates[0].reason

    class Computed(nn.Module):  # the weight is computed in the graph, not a parameter
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    report = bitcompile.explain(Computed(), torch.randn(2, 6))
    assert "not a parameter" in report.candidates[0].reason


def test_nan_zero_and_empty_inputs():
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend="bitnet", dynamic=True)
    x = torch.randn(3, 12)
    x[1, 4] = float("nan")
    y = compiled(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(compiled(torch.zeros(2, 12)), swap_to_bitlinear(model)(torch.zeros(2, 12)), **EXACT)
    assert compiled(torch.randn(0, 12)).shape == (0, 5)


def test_failing_pass_falls_back_with_one_warning_or_raises_when_strict(monkeypatch):
    from bitcompile.passes import manager

    def broken(gm, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(manager, "PASSES", (*manager.PASSES, manager.Pass("broken", broken)))
    model, x = MLP(), torch.randn(2, 12)
    with pytest.warns(BitcompileFallbackWarning, match="boom"):
        out = torch.compile(model, backend="bitnet")(x)
    torch.testing.assert_close(out, model(x))
    assert "boom" in bitcompile.report.LAST.fallbacks[0]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: no second warning for the same failure
        torch.compile(model, backend="bitnet")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="boom"):
        torch.compile(model, backend="bitnet", options={"strict": True})(x)


def test_hand_written_matmul_spellings_are_linears():
    class HandWritten(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return (
                x @ self.w.T
                + torch.matmul(x, self.w.t())
                + torch.addmm(self.b, x, self.w.t())
                + x @ self.w.transpose(0, 1)
            )

    torch.manual_seed(0)
    model, x = HandWritten(), torch.randn(3, 8)
    report = bitcompile.explain(model, x)
    assert [c.rewritten for c in report.candidates] == [True] * 4
    ops = torch.ops.bitnet
    wq, s = bitcompile.numerics.reference.quantize_weights(model.w.detach())
    y = ops.lowbit_linear(x, model.w, None, *ops.quantize_activations(x, 8), wq, s)
    expect = 4 * y + model.b
    torch.testing.assert_close(torch.compile(model, backend="bitnet")(x), expect, rtol=1e-6, atol=1e-6)
