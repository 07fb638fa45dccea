"""The layer language never runs user text.

Each attack must be a LayerSyntaxError naming its line, both from ``load()`` and from ``bitcompile
compile`` (which then writes nothing), and must not create the sentinel file it aims at. If an attack
does get through, the test runs what it produced the way a user would (construct the layer, call it;
import the written module), so a regression shows up as the sentinel file, not only as a missing error.
"""

import importlib.util
import itertools
import re
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitcompile.cli import main as cli
from bitcompile.layer_dsl import (
    MAX_EXPRESSION_CHARS,
    MAX_NESTING_DEPTH,
    MAX_SOURCE_CHARS,
    LayerSyntaxError,
    compile_source,
    load,
)

ATTACK_LINE = 6


def forward_with(statement: str, params: str = "n: int = 2", args: str = "x: Tensor") -> str:
    """A small layer with ``statement`` on line 6, inside its forward."""
    lines = ["layer Attack {", "    params {", f"        {params}", "    }", f"    forward({args}) -> Tensor {{",
             f"        {statement}", "        return x", "    }", "}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_layers(classes: dict) -> None:
    """What a user does with the classes: construct each with its defaults and call it."""
    for cls in classes.values():
        cls()(torch.ones(2))


_imports = itertools.count()


def import_module(path: Path) -> dict:
    spec = importlib.util.spec_from_file_location(f"layer_language_output_{next(_imports)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: getattr(module, name) for name in module.__all__}


def assert_rejected(text: str, line: int, message: str, tmp_path: Path, capsys, sentinel: Path = None) -> None:
    with pytest.raises(LayerSyntaxError, match=message) as err:
        run_layers(load(text, "attack.bit"))
    assert err.value.line == line
    source, output = tmp_path / "attack.bit", tmp_path / "attack_out.py"
    source.write_text(text)
    code = cli(["compile", str(source), "-o", str(output)])
    if output.exists():  # only if the attack got through
        run_layers(import_module(output))
    assert code == 1 and not output.exists()
    assert f"attack.bit:{line}: " in capsys.readouterr().err
    assert sentinel is None or not sentinel.exists()


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.mark.parametrize(
    "statement,message",
    [
        ("let r = torch.os.system('touch ' + {S})", r"torch\.os is not allowed"),
        ("torch.save(x, {S})", r"torch\.save is not allowed"),
        ("let r = torch.from_file({S}, shared=true, size=4)", r"torch\.from_file is not allowed"),
        ("let r = '{{0.__class__.__mro__}}'.format(x)", "attribute access on a literal"),
        ("let r = relu.__globals__", "private attribute"),
        ("let r = x.numpy().tofile({S})", "attribute 'numpy' is not allowed"),
        ("let r = training.__class__", "private attribute"),
        ("let r = relu.apply", "attribute access on the builtin 'torch.relu'"),
        ("let r = isinstance(x, float).real", "attribute 'real' is not allowed"),
        ("let r = x.register_hook(print)", "attribute 'register_hook' is not allowed"),
        ("let r = (lambda: open({S}, 'w'))()", "Lambda is not allowed"),
        ("let r = open({S}, 'w')", "unknown name 'open'"),
        ("let r = self.weight", "'self' is not part of the language"),
        ("let r = torch.nn.functional.relu(x)", r"torch\.nn is not allowed"),
        ("let r = x.float(**dict(__class__=1))", r"'\*\*' arguments are not allowed"),
        ("let r = f'{{x}}'", "f-strings are not allowed"),
        ("let r = [x for x in range(2)]", "ListComp is not allowed"),
    ],
)
def test_attribute_escapes_and_forbidden_syntax(statement, message, tmp_path, capsys, sentinel):
    text = forward_with(statement.format(S=repr(str(sentinel))))
    assert_rejected(text, ATTACK_LINE, message, tmp_path, capsys, sentinel)


@pytest.mark.parametrize(
    "params,args,message",
    [
        ("n: int = open({S}, 'w')", "x: Tensor", "defaults and init names must be literals"),
        ("n: int = torch.save(torch.ones(1), {S})", "x: Tensor", "defaults and init names must be literals"),
        ("n: int = 2", "x, y = open({S}, 'w')", "defaults and init names must be literals"),
        ("n: int = 2", "x=__import__('os').system('touch ' + {S})", "defaults and init names must be literals"),
        ("n: int = 2", "x: Tensor) -> Tensor {{ return open({S}, 'w') }} method g(y", "as argument"),
        ("n: str = 2", "x: Tensor", "default '2' of n is not a str"),
    ],
)
def test_defaults_are_literals_and_arguments_are_checked(params, args, message, tmp_path, capsys, sentinel):
    s = repr(str(sentinel))
    text = forward_with("let y = x", params=params.format(S=s), args=args.format(S=s))
    line = 3 if "open" in params or "save" in params or "str" in params else 5
    assert_rejected(text, line, message, tmp_path, capsys, sentinel)


def test_literal_defaults_reach_the_module_as_values(tmp_path, sentinel):
    tricky = f'x"""\\n\'\'\'\\nopen({str(sentinel)!r}, "w")\\n#'
    text = forward_with("let y = x * len(s)", params=f"s: str = {tricky!r}")
    expected = tricky
    assert load(text, "ok.bit")["Attack"]().s == expected
    (tmp_path / "ok.bit").write_text(text)
    assert cli(["compile", str(tmp_path / "ok.bit"), "-o", str(tmp_path / "ok_out.py")]) == 0
    assert import_module(tmp_path / "ok_out.py")["Attack"]().s == expected
    assert not sentinel.exists()


def test_file_name_cannot_break_out_of_generated_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the injected code would create ./pwned (a file name cannot hold '/')
    text = forward_with("x = x * n")
    name = 'a\nopen("pwned", "w")\n"""\nopen("pwned", "w")\n#\'\'\'.bit'
    classes = load(text, name)
    assert repr(name) in classes["Attack"].__doc__
    path = tmp_path / name
    path.write_text(text)
    assert cli(["compile", str(path), "-o", "out.py"]) == 0
    written = import_module(tmp_path / "out.py")
    assert repr(str(path)) in written["Attack"].__doc__
    run_layers(classes)
    run_layers(written)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "text,line,message",
    [
        ("layer import {\n forward(x) {\n return x\n }\n}\n", 1, "layer name 'import' is a Python keyword"),
        (forward_with("let y = x", params="class: int = 1"), 3, "param name 'class' is a Python keyword"),
        (forward_with("let __builtins__ = x"), 6, "may not start with '_'"),
        (forward_with("let torch = x"), 6, "variable name 'torch' is reserved"),
        (forward_with("let abs = x"), 6, "variable name 'abs' is reserved"),
        (forward_with("let y = x", args="self"), 5, "argument name 'self' is reserved"),
        (forward_with("let y = x", args="x, x"), 5, "duplicate argument 'x'"),
        (forward_with("let y = x", args="x, in"), 5, "argument name 'in' is a Python keyword"),
        ("layer L {\n forward(x) {\n return x\n }\n method __init__() {\n return 1\n }\n}\n", 5, "may not start"),
        (
            "layer L {\n param parameters: Tensor {\n shape: [2]\n }\n forward(x) {\n return x\n }\n}\n",
            2,
            "would shadow nn.Module.parameters",
        ),
        (
            "layer L {\n forward(x) {\n return x\n }\n method forward() {\n return 1\n }\n}\n",
            5,
            "would shadow nn.Module.forward",
        ),
        (
            "layer L {\n param w: Tensor {\n shape: [2]\n }\n buffer w: Tensor {\n shape: [2]\n }\n forward(x) {\n"
            " return x\n }\n}\n",
            5,
            "'w' is already defined on line 2",
        ),
        (
            "layer L {\n params {\n n: int = 1\n }\n param __dict__: Tensor {\n shape: [n]\n }\n forward(x) {\n"
            " return x\n }\n}\n",
            5,
            "may not start with '_'",
        ),
        (forward_with("let y = x", params="nä: int = 1"), 3, "is not an identifier"),
    ],
)
def test_identifiers_are_checked(text, line, message, tmp_path, capsys):
    assert_rejected(text, line, message, tmp_path, capsys)


@pytest.mark.parametrize(
    "statement,message",
    [
        ("returnx", "unknown name 'returnx'"),
        ("retrun x", "unknown statement 'retrun'"),
        ("lett y = x", "unknown statement 'lett'"),
        ("import os", "unknown statement 'import'"),
        ("else {", "only 'if condition {' opens a block"),
        ("else", "'else' without 'if'"),
        ("for y in x {", "only 'if condition {' opens a block"),
        ("x[0] = 1", "invalid expression"),
        ("return x", "unreachable statement after 'return'"),
    ],
)
def test_statements_are_strict(statement, message, tmp_path, capsys):
    line = ATTACK_LINE + 1 if statement == "return x" else ATTACK_LINE
    assert_rejected(forward_with(statement), line, message, tmp_path, capsys)


@pytest.mark.parametrize(
    "text,line,message",
    [
        (forward_with("if n > 1 {\n x = x + 1\n } junk"), 8, r"unexpected text after '}': 'junk'"),
        (forward_with("if n > 1 {\n x = x + 1\n }}"), 8, r"unexpected text after '}': '}'"),
        (forward_with("let y = x").replace("    }\n}", "    } trailing\n}"), 8, "unexpected text after"),
        (forward_with("let y = x") + "}\n", 10, "unbalanced '}'"),
        (forward_with("let y = x") + "junk\n", 10, "expected 'layer Name {'"),
        (
            forward_with("if n > 1 {\n return x\n } else {\n return -x\n } else {\n return x\n }"),
            10,
            "'else' without 'if'",
        ),
        (forward_with("let y = x").replace("return x\n    }", "return x\n    } else {"), 8, "'else' without 'if'"),
        (
            "layer L {\n param w: Tensor {\n shape: [2]\n trainable: yes\n }\n forward(x) {\n return x\n }\n}\n",
            4,
            "trainable: must be true or false",
        ),
        (
            'layer L {\n buffer b: Tensor {\n shape: [2]\n init: "ones"\n }\n forward(x) {\n return x\n }\n}\n',
            4,
            "expected one of shape:, value: in b",
        ),
        (
            "layer L {\n param w: Tensor {\n shape: [2]\n shape: [3]\n }\n forward(x) {\n return x\n }\n}\n",
            4,
            "shape: is already given on line 3",
        ),
        ("layer L {\n forward(x) -> list[int] {\n return x\n }\n}\n", 2, "expected params, param, buffer"),
        ("layer L {\n forward(x) -> Widget {\n return x\n }\n}\n", 2, "unknown return type 'Widget'"),
    ],
)
def test_block_structure_and_trailing_junk(text, line, message, tmp_path, capsys):
    assert_rejected(text, line, message, tmp_path, capsys)


def _nested_ifs(depth: int) -> str:
    opening = [f"if n > {i} {{" for i in range(depth)]
    return "\n".join(opening + ["x = x + 1"] + ["}"] * depth)


@pytest.mark.parametrize(
    "text,line,message",
    [
        (forward_with("return " + "-" * (MAX_EXPRESSION_CHARS - 100) + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "not " * 2000 + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "x ** " * 1500 + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "x + " * 1500 + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return x" + ".T" * 3000), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return relu" + "(x)" * 2000), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "(" * 150 + "x" + ")" * 150), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "x if true else " * 600 + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (forward_with("return '''a'b''' + " + "-" * 5000 + "x"), ATTACK_LINE, "MAX_NESTING_DEPTH"),
        (
            forward_with("let y = [" * 120 + "]" * 120, params="n: list = " + "[" * 120 + "]" * 120),
            3,
            "MAX_NESTING_DEPTH",
        ),
        (forward_with(_nested_ifs(10_000)), ATTACK_LINE + MAX_NESTING_DEPTH - 1, "MAX_NESTING_DEPTH"),
        (forward_with("return " + "x + 1 + " * 3000 + "x"), ATTACK_LINE, "MAX_EXPRESSION_CHARS"),
        (forward_with("return " + "-" * 10_000 + "x"), ATTACK_LINE, "MAX_EXPRESSION_CHARS"),
        (forward_with("return x" + " + x" * 2_500_000), ATTACK_LINE, "MAX_SOURCE_CHARS"),
        ("// filler\n" * (MAX_SOURCE_CHARS // 10 + 5), MAX_SOURCE_CHARS // 10 + 1, "MAX_SOURCE_CHARS"),
        (forward_with("let y = x * 0x" + "f" * 5000), ATTACK_LINE, "MAX_INT_BITS"),
        (forward_with("return x", params="n: int = 0x" + "f" * 5000), 3, "MAX_INT_BITS"),
    ],
    ids=[
        "unary-minus",
        "not",
        "power",
        "plus",
        "attributes",
        "calls",
        "parentheses",
        "conditional",
        "triple-quoted",
        "list-default",
        "if-blocks",
        "expression-size",
        "unary-minus-10k",
        "source-10MB",
        "source-lines",
        "int-literal",
        "int-default",
    ],  # fmt: skip
)
def test_depth_and_size_are_bounded(text, line, message, tmp_path, capsys):
    assert_rejected(text, line, message, tmp_path, capsys)


def test_nesting_limit_leaves_room_for_real_layers():
    depth = MAX_NESTING_DEPTH // 4  # blocks, then an expression using most of what is left
    inner = "relu(" * 20 + "x" + " + x" * 20 + ")" * 20
    classes = load(forward_with(_nested_ifs(depth).replace("x = x + 1", f"x = {inner}")), "deep.bit")
    assert classes["Attack"]()(torch.ones(2)).shape == (2,)


# -- property: random token streams inside a layer skeleton ------------------------------------------------------

SENTINEL = "@SENTINEL@"  # replaced by a path in the test's temporary directory
TOKENS = [
    "let", "return", "if", "else", "{", "}", "=", "==", "(", ")", "[", "]", ",", ".", ":", "->", "x", "y", "w",
    "n", "training", "true", "null", "relu", "linear", "torch", "F", "Q", "self", "__class__", "_x", "format", "'s'",
    '"""', "'", "1", "0.5", "-", "+", "*", "**", "not", "lambda", "layer", "param", "method", "forward", "shape:",
    "open", "__import__", "os", "system", "save", "float", "mean", "sum", "//", "\\", "\n", "\x00", "f'{x}'",
]  # fmt: skip
VALID = [
    "let y = relu(x)", "y = x * w", "let a, b = x, w", "x = torch.tanh(x) + n", "w.detach()",
    "let y = F.gelu(x)[..., 0:1]", "let t = ternary_quantize(w).trits", "if training {\nx = x + 1\n}",
    "if n > 1 {\nlet y = x\n} else {\nlet y = -x\n}",
]  # fmt: skip
ATTACKS = [
    f"let y = torch.save(x, {SENTINEL!r})", f"let y = open({SENTINEL!r}, 'w')", "x = '{0.__init__}'.format(x)",
    f"let y = __import__('os').system('touch ' + {SENTINEL!r})",
]  # fmt: skip
DEFAULT_ATTACKS = [
    f"k: int = torch.save(torch.ones(1), {SENTINEL!r})",
    f"method h(y = open({SENTINEL!r}, 'w')) {{\nreturn y\n}}",
]


def soup(size: int) -> st.SearchStrategy[str]:
    pieces = st.one_of(st.sampled_from(TOKENS), st.sampled_from(TOKENS), st.text(max_size=6))
    return st.lists(pieces, max_size=size).map(" ".join)


def lines(size: int, pool: list, weight: int, *extra: list) -> st.SearchStrategy[list]:
    """Up to ``size`` distinct lines: from ``pool`` ``weight`` times as often as token soup or each ``extra`` pool."""
    line = st.one_of(*[st.sampled_from(pool)] * weight, *(st.sampled_from(e) for e in extra), soup(8))
    return st.lists(line, max_size=size, unique=True)


@st.composite
def layer_sources(draw) -> str:
    """A layer skeleton around random parameter, tensor, statement and member lines, so most examples reach
    the forward body (and some load)."""
    params = draw(lines(2, ["m: float = 0.5", "k: int", "s: str = 'a'"], 4, DEFAULT_ATTACKS))
    spec = draw(lines(2, ['init: "zeros"', "trainable: false", "value: 1.0"], 4))
    body = draw(lines(8, VALID, 2, ATTACKS))
    tail = draw(lines(1, ["method g() {\nreturn 1\n}", "buffer b: Tensor {\nshape: [n]\n}", "}"], 2, DEFAULT_ATTACKS))
    text = "\n".join([
        "layer Random {", "params {", "n: int = 2", *params, "}", "param w: Tensor {", "shape: [n]", *spec, "}",
        "forward(x: Tensor) -> Tensor {", *body, "return x", "}", *tail, "}",
    ])  # fmt: skip
    return text + draw(st.sampled_from(["\n", "\n", "", "\n}\n", " junk\n"]))


@pytest.fixture(scope="module")
def property_sentinel(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layer_language") / "pwned"


# A valid layer but for an attacking default, which loading must never run.
PINNED = "\n".join(["layer Random {", "params {", "n: int = 2", DEFAULT_ATTACKS[0], "}",
                    "forward(x: Tensor) {", "return x", "}", "}"])  # fmt: skip


@given(text=layer_sources())
@example(text=PINNED)
def test_random_sources_load_or_fail_with_the_language_error(text, property_sentinel):
    text = text.replace(SENTINEL, str(property_sentinel))
    try:
        classes = load(text, "random.bit")
    except LayerSyntaxError as err:
        assert 1 <= err.line <= len(re.split(r"\r\n?|\n", text))
        with pytest.raises(LayerSyntaxError):
            compile_source(text, "random.bit")
    else:
        assert all(issubclass(cls, torch.nn.Module) for cls in classes.values())
        namespace: dict = {}
        exec(compile(compile_source(text, "random.bit"), "random_out.py", "exec"), namespace)
        assert namespace["__all__"] == list(classes)
    assert not property_sentinel.exists()
