"""BatchNorm after quantized conv/linear: QAT BN in training (stats of the quantized output,
running stats as eager), folded into scale/bias in inference, train<->eval switching."""

import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
import bitcompile.passes
from bitcompile.nn.reference_model import reference_model
from bitcompile.numerics import reference as ref
from bitcompile.passes.batchnorm import fold_batchnorm

# Folding reorders float32 arithmetic (scale * gamma / std applied to the int accumulator in
# one multiply instead of normalising after): a few ulps of the output magnitude.
FOLD_TOL = dict(rtol=1e-5, atol=1e-5)


def conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4)
    )


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_fold_formula_matches_bn_of_quantized_conv():
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    mean, var, gamma, beta = torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.randn(4)
    xq, xs = ref.quantize_activations_per_sample(x)
    wq, ws = ref.quantize_weights(w.flatten(1))
    args = ([1, 1], [1, 1], [1, 1], 1)
    want = F.batch_norm(ref.lowbit_conv(x, w.shape, b, xq, xs, wq, ws, *args), mean, var, gamma, beta, False, 0.1, 1e-5)
    scale, bias = fold_batchnorm(ws, b, mean, var, gamma, beta, 1e-5)
    torch.testing.assert_close(ref.lowbit_conv(x, w.shape, bias, xq, xs, wq, scale, *args), want, **FOLD_TOL)
    scale, bias = fold_batchnorm(ws, None, mean, var, None, None, 1e-3)  # no conv bias, affine=False
    want = F.batch_norm(
        ref.lowbit_conv(x, w.shape, None, xq, xs, wq, ws, *args), mean, var, None, None, False, 0.1, 1e-3
    )
    torch.testing.assert_close(ref.lowbit_conv(x, w.shape, bias, xq, xs, wq, scale, *args), want, **FOLD_TOL)


def _capture_graphs(monkeypatch):
    graphs = []
    original = bitcompile.passes.run_passes

    def spy(gm, ctx):
        out = original(gm, ctx)
        graphs.append([n.target for n in out.graph.nodes if n.op == "call_function"])
        return out

    monkeypatch.setattr(bitcompile.passes, "run_passes", spy)
    return graphs


def test_train_eval_switching_qat_stats_and_fold(monkeypatch):
    model = conv_bn()
    twin = reference_model(model)
    graphs = _capture_graphs(monkeypatch)
    compiled = torch.compile(model, backend="bitnet")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    x = torch.randn(4, 3, 6, 6)
    for step in range(2):  # training: BN on the quantized output, running stats as eager
        model.train(), twin.train()
        loss, twin_loss = compiled(x).square().mean(), twin(x).square().mean()
        torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
        loss.backward(), twin_loss.backward()
        opt.step(), twin_opt.step()
        opt.zero_grad(), twin_opt.zero_grad()
        for (name, buf), twin_buf in zip(model.named_buffers(), twin.model.buffers()):
            torch.testing.assert_close(buf, twin_buf, rtol=1e-5, atol=1e-6, msg=name)
        model.eval(), twin.eval()
        with torch.no_grad():  # inference: folded, no batch_norm node left
            torch.testing.assert_close(compiled(x), twin(x), **FOLD_TOL)
    assert any(F.batch_norm in g for g in graphs), "training graph keeps the (QAT) batch norm"
    inference = [g for g in graphs if torch.ops.bitnet.lowbit_conv.default in g and F.batch_norm not in g]
    assert inference, "an eval graph with the BN folded away"
    with torch.no_grad():
        report = bitcompile.explain(model, x)
    bns = [c for c in report.candidates if c.op == "batchnorm"]
    assert [c.module for c in bns] == ["1", "4"] and all("folded" in c.reason for c in bns), str(report)


def test_linear_bn1d_folds_and_unquantized_bn_is_left_alone():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.Flatten(),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3, bias=False),
        nn.BatchNorm1d(3),
    )
    _randomize_bn(model)
    model.eval()
    x = torch.randn(6, 5)
    with torch.no_grad():
        report = bitcompile.explain(model, x, exclude=[])
        got = torch.compile(model, backend="bitnet", options={"exclude": []})(x)
        want = reference_model(model, exclude=[])(x)
    torch.testing.assert_close(got, want, **FOLD_TOL)
    bns = {c.module: c for c in report.candidates if c.op == "batchnorm"}
    assert "folded" in bns["1"].reason and "folded" in bns["5"].reason
    assert not bns["3"].rewritten and "not a quantized" in bns["3"].reason


def test_eval_mode_with_gradients_keeps_bn_and_trains():
    model = conv_bn()
    _randomize_bn(model)
    model.eval()  # e.g. fine-tuning with frozen BN statistics
    twin = reference_model(model)
    x = torch.randn(2, 3, 6, 6)
    report = bitcompile.explain(model, x)
    assert all("kept as its own op" in c.reason for c in report.candidates if c.op == "batchnorm"), str(report)
    compiled = torch.compile(model, backend="bitnet")
    compiled(x).sum().backward()
    twin(x).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
