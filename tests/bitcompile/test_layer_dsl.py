"""The layer language: compiled modules against hand-written torch, and its errors."""

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitcompile.cli import main as cli
from bitcompile.layer_dsl import LayerSyntaxError, compile_source, load

EXAMPLE = Path(__file__).parents[2] / "examples" / "layers" / "ternary_conv.bit"


def test_example_layer_matches_hand_written_reference():
    cls = load(EXAMPLE.read_text(), "ternary_conv.bit")["TernaryConvBlock"]
    torch.manual_seed(0)
    layer = cls(3, 4, padding=0)
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)
    w, t, a = layer.weight.detach(), layer.threshold.detach().abs() + 1e-6, layer.alpha.detach()
    trits = (w > t).float() - (w < -t).float()
    torch.testing.assert_close(y, F.relu(F.conv2d(x, trits * a)))
    y.sum().backward()
    assert layer.threshold.grad.abs().sum() > 0 and layer.alpha.grad.abs().sum() > 0
    torch.testing.assert_close(layer.zero_fraction, (trits == 0).float().mean(dim=(1, 2, 3)))
    layer.eval()
    before = layer.zero_fraction.clone()
    with torch.no_grad():
        layer.weight.mul_(0.01)
        layer(x)
    assert torch.equal(layer.zero_fraction, before)  # `if training` guards the statistic
    assert layer.quantization_report().fraction_zero == pytest.approx(1.0)


def test_params_defaults_members_and_methods():
    src = """
    layer Scale {
        params {
            n: int
            gain: float = 2.0
            on: bool = true
        }
        param w: Tensor {
            shape: [n]
            init: "ones"
            trainable: false
        }
        forward(x: Tensor) -> Tensor {
            let y = x * w * gain
            if on {
                y = helper(y)
            } else {
                y = -y
            }
            return y
        }
        method helper(v: Tensor) -> Tensor {
            return v + 1
        }
    }
    """
    cls = load(src)["Scale"]
    m = cls(3)
    assert not m.w.requires_grad
    torch.testing.assert_close(m(torch.ones(3)), torch.full((3,), 3.0))
    torch.testing.assert_close(cls(3, on=False)(torch.ones(3)), torch.full((3,), -2.0))


@pytest.mark.parametrize(
    "body,line,message",
    [
        ("forward(x) {\n return mystery(x)\n }", 3, "unknown name 'mystery'"),
        ('param w: Tensor {\n shape: [2]\n init: "magic"\n }\n forward(x) {\n return x\n }', 4, "unknown init 'magic'"),
        ("method f() {\n return 1\n }", 1, "has no forward"),
        (
            "param w: Tensor {\n shape: [2]\n }\n forward(x) {\n w = x\n return x\n }",
            6,
            "cannot assign to layer member",
        ),
        ("forward(x) {\n return (lambda: x)()\n }", 3, "Lambda is not allowed"),
        ("forward(x) {\n return x._base\n }", 3, "private attribute"),
        ("widget foo\n", 2, "expected params, param, buffer, forward or method"),
        ("forward(x) {\n return x\n", 5, "unexpected end of file"),
    ],
)
def test_errors_name_the_line(body, line, message):
    src = "layer L {\n" + body + "\n}\n"
    with pytest.raises(LayerSyntaxError, match=message) as err:
        compile_source(src, "bad.bit")
    assert err.value.line == line


def test_cli_writes_the_module(tmp_path, capsys):
    out = tmp_path / "conv.py"
    assert cli(["compile", str(EXAMPLE), "-o", str(out)]) == 0
    assert "class TernaryConvBlock(nn.Module)" in out.read_text()
    bad = tmp_path / "bad.bit"
    bad.write_text("layer X {\n forward(x) {\n return nope\n }\n}\n")
    assert cli(["compile", str(bad)]) == 1
    assert "bad.bit:3: unknown name 'nope'" in capsys.readouterr().err


DENSE = """
layer TernaryDense {
    params {
        in_features: int
        out_features: int
    }
    param weight: Tensor {
        shape: [out_features, in_features]
        init: "kaiming_normal"
    }
    forward(x: Tensor) -> Tensor {
        let w = ste_quantize(weight)
        return linear(x, w)
    }
    method sparsity() -> float {
        return mean((ternary_quantize(weight).trits == 0).float()).item()
    }
}
"""


def test_gradients_flow_through_quant_primitives_and_forward_compiles():
    torch.manual_seed(0)
    layer = load(DENSE, "dense.bit")["TernaryDense"](5, 3)
    x = torch.randn(4, 5)
    expected = layer(x)
    expected.sum().backward()
    assert layer.weight.grad.abs().sum() > 0
    assert 0.0 <= layer.sparsity() <= 1.0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    conv = load(EXAMPLE.read_text(), "ternary_conv.bit")["TernaryConvBlock"](3, 4)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(torch.compile(conv, backend="aot_eager", fullgraph=True)(x), conv(x))


def test_runtime_errors_point_at_the_layer_source():
    cls = load("layer L {\n forward(x) {\n let y = x + 1\n return matmul(y, y)\n }\n}\n", "shapes.bit")["L"]
    with pytest.raises(RuntimeError) as err:
        cls()(torch.ones(2, 3))
    assert ("shapes.bit", 4) in [(frame.filename, frame.lineno) for frame in traceback.extract_tb(err.tb)]
