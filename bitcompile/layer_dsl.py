"""The layer language: ``nn.Module`` layers described in a small, closed language.

    layer TernaryDense {
        params {
            in_features: int
            out_features: int
            threshold: float = 0.05
        }
        param weight: Tensor {
            shape: [out_features, in_features]
            init: "kaiming_normal"
        }
        forward(x: Tensor) -> Tensor {
            // ternary weights with a straight-through gradient
            let w = ste_quantize(weight)
            return linear(x, w)
        }
        method sparsity() -> float {
            return mean((ternary_quantize(weight).trits == 0).float()).item()
        }
    }

Grammar, one item per line (``//`` starts a comment):

- ``layer Name {`` ... ``}``, holding ``params { name: type [= literal] }`` (constructor arguments),
  ``param name: Tensor { ... }`` and ``buffer name: Tensor { ... }`` (keys ``shape:`` (required),
  ``value:``, and for params ``init:`` (a name from :data:`INITS`) and ``trainable: true|false``),
  one ``forward(args) [-> type] {`` and any ``method name(args) [-> type] {``. Arguments are
  ``name [: type] [= literal]``; types come from :data:`TYPES`.
- Statements: ``let a[, b] = expr``, ``a[, b] = expr``, ``return [expr]``, a bare expression and
  ``if cond {`` / ``} else {`` / ``}``. Nothing may follow a ``return`` in its block.
- Literals (defaults): numbers, strings, ``true``/``false``/``null`` (or Python's spelling) and
  lists/tuples of literals.

Expressions are Python expression syntax, parsed with :func:`ast.parse` and checked node by node:

- Names are locals, arguments, layer members (``weight`` means ``self.weight``), ``training``,
  ``true``/``false``/``null``, or builtins: the ``bitcompile.quant`` functions and classes,
  :data:`TORCH` and :data:`FUNCTIONAL` (also spelled ``torch.relu``, ``F.conv2d``, plus the dtypes
  and constants in :data:`TORCH_VALUES` such as ``torch.int8``) and the Python builtins in
  :data:`PYTHON`. Builtins are looked up by value in a table built from these lists.
- Calls go to a builtin function, a layer method or an allowed method of a value (``x.float()``).
- Attributes: only the names in :data:`ATTRIBUTES` (tensor methods and properties, quantized
  tensor fields), never a name starting with ``_``, and never on a literal, a builtin or a module
  (no ``'{0.__class__}'.format(x)``, no ``torch.os``).
- Not allowed: lambda, comprehensions, f-strings, ``:=``, dict/set literals, ``**kwargs``,
  bytes and complex literals, integers wider than :data:`MAX_INT_BITS` bits, ``self``.

Identifiers (layer, member, argument and local names) are ASCII, not Python keywords, do not start
with ``_``, and do not shadow the generated code's own names (``self``, ``torch``, ``F``, ``nn``,
``Q``, ``super``, ``training``, the :data:`PYTHON` builtins and the type names). Members also may
not shadow ``nn.Module`` attributes. Every violation is a :class:`LayerSyntaxError` naming the file
and line, raised before anything is compiled.

Limits, checked before any text reaches Python's parser, each a LayerSyntaxError naming the limit:
:data:`MAX_SOURCE_CHARS` for the source, :data:`MAX_EXPRESSION_CHARS` for each line (so for each
expression) and :data:`MAX_NESTING_DEPTH` for the enclosing ``if`` blocks plus the brackets and
operators of an expression. They bound the text, not the work a layer does when it runs.

Why it is safe: user text never becomes source code. The parser turns each line into a validated
tree (checked identifiers, literal values, expressions as checked ``ast`` nodes). :func:`load`
builds the classes from that tree and fixed templates as an ``ast.Module``, compiles that tree
(no text is parsed again) and runs it with ``torch``, ``F``, ``Q`` and ``nn`` bound to namespaces
holding only the allowed objects and what the templates use (there is no ``torch.os`` to reach).
Running it only defines the classes: defaults are literals, shapes are evaluated when a layer is
constructed. :func:`compile_source` (``bitcompile compile``) writes the same tree with
:func:`ast.unparse`, so every string, the file name included, reaches the file as a Python
literal. Compiling ``ast`` nodes rather than interpreting the tree keeps ``forward`` a plain Python
function that ``torch.compile`` traces, and tracebacks name the ``.bit`` file and line.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import keyword
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

MAX_SOURCE_CHARS = 1_000_000
MAX_EXPRESSION_CHARS = 10_000  # per line, which bounds every expression, argument list and default
MAX_NESTING_DEPTH = 100  # if blocks plus brackets and operators, at any point of a function body
MAX_INT_BITS = 64  # integer literals; larger ones cannot be written back as decimal source

TORCH = {
    "matmul", "relu", "sigmoid", "tanh", "softmax", "sign", "clamp", "where", "mean", "sum", "exp", "log",
    "sqrt", "rsqrt", "zeros_like", "ones_like", "cat", "stack", "amax", "amin", "einsum", "flatten",
    "transpose", "tensor", "zeros", "ones", "randn", "rand", "std", "var", "quantile", "topk", "argmax",
}  # fmt: skip
# Values reachable only as ``torch.<name>``: dtypes, constants and ``torch.Tensor`` (for isinstance).
TORCH_VALUES = {
    "float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
    "float", "half", "double", "long", "int", "Tensor", "pi", "inf",
}  # fmt: skip
FUNCTIONAL = {
    "linear", "conv1d", "conv2d", "gelu", "silu", "layer_norm", "rms_norm", "dropout", "pad", "batch_norm",
    "scaled_dot_product_attention", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "one_hot",
    "cross_entropy", "mse_loss", "normalize",
}  # fmt: skip
PYTHON = {
    "abs", "round", "min", "max", "len", "range", "float", "int", "bool", "tuple", "list", "dict", "isinstance",
    "print",
}  # fmt: skip
# Attribute names allowed on values (the only attribute access besides torch.<name> and F.<name>).
ATTRIBUTES = frozenset({
    # tensor properties
    "shape", "dtype", "device", "ndim", "T", "mT", "requires_grad",
    # shape, dtype and layout
    "size", "dim", "numel", "item", "tolist", "float", "half", "bfloat16", "double", "int", "long", "bool", "to",
    "type_as", "contiguous", "detach", "clone", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "squeeze", "unsqueeze", "permute", "transpose", "t", "expand", "expand_as", "repeat", "chunk", "split", "narrow",
    "flip", "roll",
    # arithmetic and reductions
    "abs", "sign", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "sigmoid", "tanh", "relu", "clamp", "clip", "round",
    "floor", "ceil", "add", "sub", "mul", "div", "sum", "mean", "std", "var", "amax", "amin", "max", "min", "argmax",
    "argmin", "norm", "prod", "cumsum", "any", "all", "eq", "ne", "gt", "ge", "lt", "le", "matmul", "masked_fill",
    "where", "softmax", "log_softmax", "lerp",
    # in place, for buffers (running statistics)
    "copy_", "add_", "mul_", "zero_", "fill_", "clamp_", "lerp_",
    # quantized tensors (bitcompile.quant.QuantizedTensor, TernaryTensor) and QuantizationReport
    "trits", "codes", "scale", "zero_point", "neg_scale", "dequantize", "sparsity", "counts",
    "mse", "mae", "fraction_negative", "fraction_zero", "fraction_positive",
})  # fmt: skip
# init name -> (torch.nn.init function, keyword arguments)
INITS = {
    "kaiming_normal": ("kaiming_normal_", {}),
    "kaiming_uniform": ("kaiming_uniform_", {"a": 5**0.5}),
    "xavier_uniform": ("xavier_uniform_", {}),
    "xavier_normal": ("xavier_normal_", {}),
    "normal": ("normal_", {"std": 0.02}),
    "uniform": ("uniform_", {"a": -0.1, "b": 0.1}),
    "zeros": ("zeros_", {}),
    "ones": ("ones_", {}),
}
TYPES = {"int", "float", "bool", "str", "list", "tuple", "dict", "Tensor"}
# A declared type -> the literal types its default may have (bool counts only as bool).
_DEFAULT_TYPES = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "list": (list, tuple), "tuple": (tuple, list),
}  # fmt: skip
_CONSTANTS = {"true": True, "false": False, "null": None}
# Names the generated code relies on; user identifiers may not rebind them.
_RESERVED = {"self", "torch", "F", "nn", "Q", "super", "training"} | set(_CONSTANTS) | PYTHON | (TYPES - {"Tensor"})
_MODULE_ATTRIBUTES = set(dir(nn.Module))
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\nfrom bitcompile import quant as Q\n"


class LayerSyntaxError(ValueError):
    def __init__(self, filename: str, line: int, message: str):
        super().__init__(f"{filename}:{line}: {message}")
        self.line = line


# -- the validated tree ------------------------------------------------------------------------------------------

_MISSING = object()  # a parameter or argument without a default


@dataclass
class Param:
    name: str
    type: Optional[str]
    line: int
    default: Any = _MISSING  # a literal value: number, str, bool, None, or a list/tuple of literals


@dataclass
class TensorDecl:
    name: str
    line: int
    buffer: bool
    shape: tuple[int, ast.expr]  # (line, parsed expression)
    value: Optional[tuple[int, ast.expr]] = None
    init: str = "kaiming_uniform"
    trainable: bool = True


@dataclass
class Assign:
    line: int
    names: list[str]
    value: ast.expr


@dataclass
class Return:
    line: int
    value: Optional[ast.expr]


@dataclass
class Expression:
    line: int
    value: ast.expr


@dataclass
class If:
    line: int
    test: ast.expr
    body: list
    orelse: list


Statement = Union[Assign, Return, Expression, If]


@dataclass
class Function:
    name: str
    line: int
    args: list[Param]
    returns: Optional[str]
    body: list[Statement]


@dataclass
class Layer:
    name: str
    line: int
    params: list[Param] = field(default_factory=list)
    tensors: list[TensorDecl] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)


# -- entry points ------------------------------------------------------------------------------------------------


def parse(text: str, filename: str = "<layer>") -> list[Layer]:
    """DSL source -> validated layers (syntax, identifiers, literals and limits; names are resolved later)."""
    return _Parser(text, filename).parse()


def compile_source(text: str, filename: str = "<layer>") -> str:
    """DSL source -> Python module source (one ``nn.Module`` class per ``layer``)."""
    classes = ast.Module(_classes(text, filename), [])
    docstring = f"Generated by `bitcompile compile` from {filename!r}; edit the source, not this file."
    parts = [ast.Module([ast.Expr(ast.Constant(docstring))], []), _HEADER, classes]
    return "\n".join(p if isinstance(p, str) else ast.unparse(ast.fix_missing_locations(p)) + "\n" for p in parts)


def load(text: str, filename: str = "<layer>") -> dict[str, type]:
    """Compile in memory: ``{layer name: nn.Module class}``. Runs no user text (see the module docstring)."""
    module = ast.fix_missing_locations(ast.Module(_classes(text, filename), []))
    namespace = _namespace("bitcompile_layers_" + re.sub(r"\W", "_", filename))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # e.g. `x is 1`: valid, and not the user's concern here
        code = compile(module, filename.replace("\0", "\\0"), "exec")  # a NUL is the one character it refuses
    exec(code, namespace)  # defines the classes: every statement comes from the validated tree
    return {name: namespace[name] for name in namespace["__all__"]}


def _classes(text: str, filename: str) -> list[ast.stmt]:
    """``__all__`` and one class definition per layer, all names resolved (or a LayerSyntaxError)."""
    layers = parse(text, filename)
    classes = [_Builder(layer, filename).build() for layer in layers]
    names = ast.List([ast.Constant(layer.name) for layer in layers], ast.Load())
    return [ast.Assign([ast.Name("__all__", ast.Store())], names), *classes]


# -- allowed objects, by value -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    module: Optional[str]  # how generated code reaches it: "torch", "F", "Q", or None for a Python builtin
    name: str
    value: Any

    def node(self) -> ast.expr:
        if self.module is None:
            return ast.Name(self.name, ast.Load())
        return ast.Attribute(ast.Name(self.module, ast.Load()), self.name, ast.Load())

    @property
    def spelling(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


@functools.cache
def _registry() -> tuple[dict[str, _Builtin], dict[str, dict[str, _Builtin]]]:
    """(bare names, {"torch": ..., "F": ...} for attribute chains), each mapping a name to its object."""
    from bitcompile import quant

    quant_objects = {n: getattr(quant, n) for n in quant.__all__}
    quant_table = {
        n: _Builtin("Q", n, v) for n, v in quant_objects.items() if inspect.isfunction(v) or inspect.isclass(v)
    }
    torch_table = {n: _Builtin("torch", n, getattr(torch, n)) for n in sorted(TORCH | TORCH_VALUES)}
    functional = {n: _Builtin("F", n, getattr(F, n)) for n in sorted(FUNCTIONAL)}
    python = {n: _Builtin(None, n, getattr(builtins, n)) for n in sorted(PYTHON)}
    bare: dict[str, _Builtin] = {}
    # Later tables win: a bare name means the Python builtin, else the quant one, else torch, else F.
    for table in (functional, {n: torch_table[n] for n in TORCH}, quant_table, python):
        bare.update(table)
    return bare, {"torch": torch_table, "F": functional}


def _namespace(module_name: str) -> dict:
    """Globals for :func:`load`: ``torch``, ``F``, ``Q`` and ``nn`` hold only the allowed objects and what the
    fixed templates use."""
    bare, chains = _registry()
    template_torch = {n: getattr(torch, n) for n in ("empty", "full", "zeros", "no_grad", "Tensor")}
    quant = {b.name: b.value for b in bare.values() if b.module == "Q"}
    init = types.SimpleNamespace(**{fn: getattr(nn.init, fn) for fn, _ in INITS.values()})
    # Python's builtins stay whole: torch.compile guards code it inlines through them, and C functions import
    # through them. The language reaches only the PYTHON names; everything else in the tree is a template.
    return {
        "__builtins__": builtins,
        "__name__": module_name,
        "torch": types.SimpleNamespace(**({n: b.value for n, b in chains["torch"].items()} | template_torch)),
        "F": types.SimpleNamespace(**{n: b.value for n, b in chains["F"].items()}),
        "Q": types.SimpleNamespace(**quant),
        "nn": types.SimpleNamespace(Module=nn.Module, Parameter=nn.Parameter, init=init),
    }


# -- parsing: text -> validated tree -----------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, filename: str):
        self.filename = filename
        if len(text) > MAX_SOURCE_CHARS:
            line = text.count("\n", 0, MAX_SOURCE_CHARS) + 1
            self.error(line, f"source longer than MAX_SOURCE_CHARS = {MAX_SOURCE_CHARS} characters")
        self.lines = []
        for number, raw in enumerate(re.split(r"\r\n?|\n", text), 1):  # the line breaks of Python source
            if len(raw) > MAX_EXPRESSION_CHARS:
                self.error(number, f"line longer than MAX_EXPRESSION_CHARS = {MAX_EXPRESSION_CHARS} characters")
            if stripped := _strip_comment(raw).strip():
                self.lines.append((number, stripped))
        self.pos = 0

    def error(self, line: int, message: str):
        raise LayerSyntaxError(self.filename, line, message)

    def next(self) -> tuple[int, str]:
        if self.pos >= len(self.lines):
            last = self.lines[-1][0] if self.lines else 1
            self.error(last, "unexpected end of file (missing '}')")
        self.pos += 1
        return self.lines[self.pos - 1]

    def parse(self) -> list[Layer]:
        layers: dict[str, Layer] = {}
        while self.pos < len(self.lines):
            n, s = self.next()
            m = re.fullmatch(r"layer\s+(\S+?)\s*\{", s)
            if not m:
                self.error(n, "unbalanced '}'" if s.startswith("}") else f"expected 'layer Name {{', got {_show(s)}")
            name = self.identifier(m.group(1), n, "layer name")
            if name in layers:
                self.error(n, f"layer {name} is already defined on line {layers[name].line}")
            layers[name] = self.layer(name, n)
        if not layers:
            self.error(1, "no layer defined")
        return list(layers.values())

    # -- layer members

    def layer(self, name: str, line: int) -> Layer:
        layer, members = Layer(name, line), {}

        def member(member_name: str, member_line: int, what: str) -> str:
            if member_name in members:
                self.error(member_line, f"{member_name!r} is already defined on line {members[member_name]}")
            if member_name in _MODULE_ATTRIBUTES:
                self.error(member_line, f"{what} name {member_name!r} would shadow nn.Module.{member_name}")
            members[member_name] = member_line
            return member_name

        while True:
            n, s = self.next()
            if s == "}":
                break
            if s.startswith("}"):
                self.error(n, f"unexpected text after '}}': {_show(s[1:].strip())}")
            if re.fullmatch(r"params\s*\{", s):
                for p in self.params():
                    layer.params.append(p)
                    member(p.name, p.line, "param")
            elif m := re.fullmatch(r"(param|buffer)\s+([^\s:]+)\s*:\s*Tensor\s*\{", s):
                tensor_name = member(self.identifier(m.group(2), n, m.group(1) + " name"), n, m.group(1))
                layer.tensors.append(self.tensor(tensor_name, n, m.group(1) == "buffer"))
            elif m := re.fullmatch(r"(?:forward|method\s+([^\s(]+))\s*\((.*)\)\s*(?:->\s*(\w+))?\s*\{", s):
                if m.group(1) is not None:
                    fname = member(self.identifier(m.group(1), n, "method name"), n, "method")
                elif any(f.name == "forward" for f in layer.functions):
                    self.error(n, f"layer {name} has a second forward")
                else:
                    fname = "forward"
                args, returns = self.arguments(m.group(2), n), self.return_type(m.group(3), n)
                layer.functions.append(Function(fname, n, args, returns, self.function_body()))
            else:
                self.error(n, f"expected params, param, buffer, forward or method in layer {name}, got {_show(s)}")
        if not any(f.name == "forward" for f in layer.functions):
            self.error(line, f"layer {name} has no forward")
        return layer

    def params(self) -> list[Param]:
        out = []
        while (item := self.next())[1] != "}":
            n, s = item
            m = re.fullmatch(r"([^\s:]+)\s*:\s*(\w+)\s*\??\s*(?:=\s*(.*))?", s)
            if not m:
                self.error(n, f"expected 'name: type [= default]', got {_show(s)}")
            out.append(self.param(m.group(1), m.group(2), m.group(3), n, "param"))
        return out

    def param(self, name: str, type_: Optional[str], default: Optional[str], line: int, what: str) -> Param:
        name = self.identifier(name, line, what + " name")
        if type_ is not None and type_ not in TYPES:
            self.error(line, f"unknown type {type_!r}; types: {', '.join(sorted(TYPES))}")
        if default is None:
            return Param(name, type_, line)
        value = self.literal(default, line)
        if value is not None and type_ in _DEFAULT_TYPES:
            allowed = _DEFAULT_TYPES[type_]
            if not isinstance(value, allowed) or (type(value) is bool and type_ != "bool"):
                self.error(line, f"default {_show(default)} of {name} is not a {type_}")
        return Param(name, type_, line, value)

    def tensor(self, name: str, line: int, buffer: bool) -> TensorDecl:
        spec: dict[str, tuple[int, str]] = {}
        keys = ("shape", "value") if buffer else ("shape", "value", "init", "trainable")
        while (item := self.next())[1] != "}":
            n, s = item
            m = re.fullmatch(r"(\w+)\s*:\s*(.*)", s)
            if not m or m.group(1) not in keys:
                self.error(n, f"expected one of {', '.join(k + ':' for k in keys)} in {name}, got {_show(s)}")
            if m.group(1) in spec:
                self.error(n, f"{m.group(1)}: is already given on line {spec[m.group(1)][0]}")
            spec[m.group(1)] = (n, m.group(2).strip())
        if "shape" not in spec:
            self.error(self.lines[self.pos - 1][0], f"tensor {name} needs a 'shape:'")
        if "value" in spec and "init" in spec:
            self.error(spec["init"][0], f"tensor {name} has both 'value:' and 'init:'")
        tensor = TensorDecl(name, line, buffer, self.expression_at(*spec["shape"]))
        if "value" in spec:
            tensor.value = self.expression_at(*spec["value"])
        if "init" in spec:
            n, text = spec["init"]
            init = text if _IDENTIFIER.fullmatch(text) else self.literal(text, n)
            if not isinstance(init, str) or init not in INITS:
                self.error(n, f"unknown init {init!r}; supported: {', '.join(INITS)}")
            tensor.init = init
        if "trainable" in spec:
            n, text = spec["trainable"]
            if text not in ("true", "false", "True", "False"):
                self.error(n, f"trainable: must be true or false, got {_show(text)}")
            tensor.trainable = text in ("true", "True")
        return tensor

    def arguments(self, text: str, line: int) -> list[Param]:
        args: list[Param] = []
        for part in _split_arguments(text):
            m = re.fullmatch(r"([^\s:=]+)\s*(?::\s*(\w+))?\s*(?:=\s*(.*))?", part.strip())
            if not m:
                self.error(line, f"expected 'name [: type] [= default]' as argument, got {_show(part.strip())}")
            arg = self.param(m.group(1), m.group(2), m.group(3), line, "argument")
            if any(a.name == arg.name for a in args):
                self.error(line, f"duplicate argument {arg.name!r}")
            if arg.default is _MISSING and args and args[-1].default is not _MISSING:
                self.error(line, f"argument {arg.name!r} without a default follows one with a default")
            args.append(arg)
        return args

    def return_type(self, name: Optional[str], line: int) -> Optional[str]:
        if name is not None and name not in TYPES | {"None"}:
            self.error(line, f"unknown return type {name!r}; types: {', '.join(sorted(TYPES | {'None'}))}")
        return name

    def identifier(self, name: str, line: int, what: str) -> str:
        if not _IDENTIFIER.fullmatch(name):
            self.error(line, f"{what} {_show(name)} is not an identifier (ASCII letters, digits and '_')")
        if name.startswith("_"):
            self.error(line, f"{what} {name!r} may not start with '_'")
        if keyword.iskeyword(name):
            self.error(line, f"{what} {name!r} is a Python keyword")
        if name in _RESERVED:
            self.error(line, f"{what} {name!r} is reserved (a name the language or its generated code uses)")
        return name

    # -- function bodies

    def function_body(self) -> list[Statement]:
        body, else_line = self.block(1)
        if else_line is not None:
            self.error(else_line, "'else' without 'if'")
        return body

    def block(self, depth: int) -> tuple[list[Statement], Optional[int]]:
        """Statements up to the closing ``}`` (returns None) or ``} else {`` (returns its line)."""
        out: list[Statement] = []
        while True:
            n, s = self.next()
            if s.startswith("}"):
                rest = s[1:].strip()
                if not rest:
                    return out, None
                if re.fullmatch(r"else\s*\{", rest):
                    return out, n
                self.error(n, f"unexpected text after '}}': {_show(rest)} (only '}} else {{' may follow)")
            if out and isinstance(out[-1], Return):
                self.error(n, f"unreachable statement after 'return' on line {out[-1].line}")
            out.append(self.statement(n, s, depth))

    def statement(self, n: int, s: str, depth: int) -> Statement:
        first = m.group() if (m := re.match(r"[A-Za-z_]\w*", s)) else ""
        if first == "if":
            if not s.endswith("{"):
                self.error(n, "expected 'if condition {'")
            if depth + 1 > MAX_NESTING_DEPTH:
                self.error(n, f"blocks nested deeper than MAX_NESTING_DEPTH = {MAX_NESTING_DEPTH}")
            test = self.expression(s[2:-1].strip(), n, depth)
            body, else_line = self.block(depth + 1)
            orelse: list[Statement] = []
            if else_line is not None:
                orelse, again = self.block(depth + 1)
                if again is not None:
                    self.error(again, "'else' without 'if'")
            return If(n, test, body, orelse)
        if s.endswith("{"):
            self.error(n, "only 'if condition {' opens a block inside a function")
        if first == "else":
            self.error(n, "'else' without 'if' (write '} else {' to close an if block)")
        if first == "return":
            rest = s[len(first) :].strip()
            return Return(n, self.expression(rest, n, depth) if rest else None)
        if first == "let":
            if not (m := re.fullmatch(r"let\s+(\w+(?:\s*,\s*\w+)*)\s*=(?!=)\s*(.*)", s)):
                self.error(n, f"expected 'let name = expression', got {_show(s)}")
            return self.assignment(m.group(1), m.group(2), n, depth)
        if m := re.match(r"(\w+(?:\s*,\s*\w+)*)\s*=(?!=)", s):
            return self.assignment(m.group(1), s[m.end() :], n, depth)
        two_words = re.match(r"([A-Za-z_]\w*)\s+([A-Za-z_]\w*|[0-9\"'(\[])", s)
        if two_words and not keyword.iskeyword(two_words.group(2)):
            try:  # a misspelled or unknown statement keyword, unless the line parses as an expression
                self.expression(s, n, depth)
            except LayerSyntaxError:
                known = "let, return, if, assignments, expressions"
                self.error(n, f"unknown statement {two_words.group(1)!r} (statements: {known})")
        return Expression(n, self.expression(s, n, depth))

    def assignment(self, targets: str, value: str, line: int, depth: int) -> Assign:
        names = [self.identifier(t.strip(), line, "variable name") for t in targets.split(",")]
        if len(set(names)) != len(names):
            self.error(line, f"a name appears twice in {_show(targets)}")
        return Assign(line, names, self.expression(value.strip(), line, depth))

    # -- expressions and literals

    def expression_at(self, line: int, text: str) -> tuple[int, ast.expr]:
        return line, self.expression(text, line, 0)

    def expression(self, text: str, line: int, depth: int = 0) -> ast.expr:
        """Parse one expression (names unresolved), checking the nesting limit before the parser sees it."""
        if not text:
            self.error(line, "missing expression")
        limit, too_deep = MAX_NESTING_DEPTH - depth, f"nested deeper than MAX_NESTING_DEPTH = {MAX_NESTING_DEPTH}"
        nesting = _nesting(text)
        if nesting is None:  # their {...} parts are parsed again, out of the scan's sight
            self.error(line, f"invalid expression {_show(text)}: f-strings are not allowed")
        if nesting > limit:
            self.error(line, f"expression {too_deep} (counting its enclosing blocks)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences and the like: the parse still stands
                tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            self.error(line, f"invalid expression {_show(text)}: {err.msg}")
        except (ValueError, MemoryError, RecursionError) as err:  # NUL bytes, unencodable text; the scan keeps the
            self.error(line, f"invalid expression {_show(text)}: {err or 'too complex'}")  # other two away
        if _depth(tree.body) - 1 > limit:
            self.error(line, f"expression {too_deep} (counting its enclosing blocks)")
        return tree.body

    def literal(self, text: str, line: int) -> Any:
        node = self.expression(text, line)
        try:
            return _literal_value(node)
        except ValueError as err:
            self.error(
                line,
                f"defaults and init names must be literals (numbers, strings, true/false/null, lists "
                f"and tuples of literals), got {_show(text)}: {err}",
            )


def _literal_value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool, type(None)):
        return _check_constant(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal_value(node.operand)
        if type(value) not in (int, float):
            raise ValueError("a sign applies only to numbers")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal_value(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    raise ValueError(f"{type(node).__name__} is not a literal")


def _check_constant(value: Any) -> Any:
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"integer literal wider than MAX_INT_BITS = {MAX_INT_BITS} bits")
    return value


def _literal_node(value: Any) -> ast.expr:
    if isinstance(value, (list, tuple)):
        elts = [_literal_node(v) for v in value]
        return ast.List(elts, ast.Load()) if isinstance(value, list) else ast.Tuple(elts, ast.Load())
    return ast.Constant(value)


_SCAN = re.compile(
    r"\\.|'''|\"\"\"|['\"]"  # escapes, string delimiters
    r"|(?:0[xXoObB][\da-fA-F_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d[\d_]*)?[jJ]?)"  # numbers
    r"|[A-Za-z_]\w*|\*\*|//|<<|>>|[<>=!]=|.",  # words, operators, any other character
    re.S,
)
_NESTING_TOKENS = {
    "**", "//", "<<", ">>", "+", "-", "~", "*", "/", "%", "@", "&", "|", "^", "<", ">", "==", "!=", "<=", ">=",
    ".", "not", "and", "or", "if", "else", "lambda", "in", "is", "await", "yield", "for",
}  # fmt: skip


def _nesting(text: str) -> Optional[int]:
    """How deep Python's parser may recurse on ``text``, estimated in linear time without parsing: at each point,
    the open brackets plus the operators, dots, calls and subscripts since the enclosing bracket or comma.
    None for an f-string, whose contents the scan cannot see."""
    counts, total, deepest = [0], 0, 0
    quote, previous, operand = None, None, False  # operand: the last token ends an operand, so "(" is a call
    for m in _SCAN.finditer(text):
        token = m.group()
        if quote:
            if token == quote:  # `\\.` tokens keep escaped quotes inside the string
                quote, operand = None, True
            continue
        if token.isspace():
            continue
        if token in ("'", '"', "'''", '"""'):
            if previous and previous.end() == m.start() and previous.group().lower() in ("f", "rf", "fr"):
                return None
            quote = token
        elif token in ("(", "[", "{"):
            if operand:  # a call or subscript nests like an operator
                counts[-1] += 1
                total += 1
            counts.append(0)
        elif token in (")", "]", "}"):
            if len(counts) > 1:
                total -= counts.pop()
        elif token == ",":
            total -= counts[-1]
            counts[-1] = 0
        elif token in _NESTING_TOKENS:
            counts[-1] += 1
            total += 1
        operand = token in (")", "]", "}") or token not in _NESTING_TOKENS and (token[0].isalnum() or token[0] in "_.")
        deepest = max(deepest, len(counts) - 1 + total)
        previous = m
    return deepest


def _depth(node: ast.AST) -> int:
    """Nesting of expression nodes in a parsed tree (iterative: the tree may be deep)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + isinstance(child, ast.expr)) for child in ast.iter_child_nodes(node))
    return deepest


def _split_arguments(text: str) -> list[str]:
    """Split an argument list at its top-level commas (not inside brackets or strings)."""
    if not text.strip():
        return []
    parts, start, depth, quote, escaped = [], 0, 0, None, False
    for i, ch in enumerate(text):
        if quote:
            escaped, quote = (False, quote) if escaped else (ch == "\\", None if ch == quote else quote)
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _strip_comment(line: str) -> str:
    """The line up to a ``//`` that is not inside a string literal."""
    if "//" not in line:
        return line
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if quote:
            escaped, quote = (False, quote) if escaped else (ch == "\\", None if ch == quote else quote)
        elif ch in "\"'":
            quote = ch
        elif ch == "/" and line.startswith("//", i):
            return line[:i]
    return line


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- building: validated tree -> Python ast ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    name: str


@dataclass(frozen=True)
class _Module:
    name: str  # "torch" or "F": only usable as the head of torch.<name> / F.<name>


def _self(name: str, ctx: ast.expr_context = None) -> ast.Attribute:
    return ast.Attribute(ast.Name("self", ast.Load()), name, ctx or ast.Load())


def _call(func: ast.expr, *args: ast.expr, **kwargs: ast.expr) -> ast.Call:
    return ast.Call(func, list(args), [ast.keyword(k, v) for k, v in kwargs.items()])


def _dotted(path: str) -> ast.expr:
    head, *rest = path.split(".")
    node: ast.expr = ast.Name(head, ast.Load())
    for part in rest:
        node = ast.Attribute(node, part, ast.Load())
    return node


def _annotation(type_: Optional[str]) -> Optional[ast.expr]:
    if type_ is None:
        return None
    return _dotted("torch.Tensor") if type_ == "Tensor" else ast.Constant(None) if type_ == "None" else _dotted(type_)


def _locate(node: ast.AST, line: int) -> ast.AST:
    """Give every node without a position the DSL line, so tracebacks from load() name the .bit line. Subtrees
    are located bottom-up and whole, so a node that has a position is skipped with everything below it."""
    stack = [node]
    while stack:
        child = stack.pop()
        if "lineno" in child._attributes:
            if hasattr(child, "lineno"):
                continue
            child.lineno = child.end_lineno = line
            child.col_offset = child.end_col_offset = 0
        stack.extend(ast.iter_child_nodes(child))
    return node


class _Builder:
    """One validated layer -> an ``ast.ClassDef``, resolving every name on the way."""

    def __init__(self, layer: Layer, filename: str):
        self.layer, self.filename = layer, filename
        self.values = {p.name for p in layer.params} | {t.name for t in layer.tensors} | {"training"}
        self.methods = {f.name for f in layer.functions if f.name != "forward"} | {"forward"}

    def error(self, line: int, message: str):
        raise LayerSyntaxError(self.filename, line, message)

    def build(self) -> ast.ClassDef:
        layer = self.layer
        doc = ast.Expr(ast.Constant(f"Compiled from layer {layer.name} ({self.filename!r}, line {layer.line})."))
        body = [doc, self.init(), *(self.function(f) for f in layer.functions)]
        cls = ast.ClassDef(layer.name, [_dotted("nn.Module")], [], body, [])
        return _locate(cls, layer.line)

    def init(self) -> ast.FunctionDef:
        params = self.layer.params
        ordered = [p for p in params if p.default is _MISSING] + [p for p in params if p.default is not _MISSING]
        body: list[ast.stmt] = [ast.Expr(_call(ast.Attribute(_call(_dotted("super")), "__init__", ast.Load())))]
        for p in params:
            body.append(ast.Assign([_self(p.name, ast.Store())], ast.Name(p.name, ast.Load())))
        scope = {p.name for p in params}
        for t in self.layer.tensors:
            body += [_locate(stmt, t.line) for stmt in self.tensor(t, scope)]
        return self.function_def("__init__", ordered, None, body)

    def tensor(self, t: TensorDecl, scope: set[str]) -> list[ast.stmt]:
        shape = self.expr(*t.shape, scope)
        if t.value is not None:
            data = _call(_dotted("torch.full"), shape, self.expr(*t.value, scope))
        else:
            data = _call(_dotted("torch.zeros" if t.buffer else "torch.empty"), shape)
        if t.buffer:
            return [ast.Expr(_call(_self("register_buffer"), ast.Constant(t.name), data))]
        parameter = _call(_dotted("nn.Parameter"), data, requires_grad=ast.Constant(t.trainable))
        out: list[ast.stmt] = [ast.Assign([_self(t.name, ast.Store())], parameter)]
        if t.value is None:
            fn, kwargs = INITS[t.init]
            init = _call(_dotted("nn.init." + fn), _self(t.name), **{k: ast.Constant(v) for k, v in kwargs.items()})
            out.append(ast.With([ast.withitem(_call(_dotted("torch.no_grad")))], [ast.Expr(init)]))
        return out

    def function(self, f: Function) -> ast.FunctionDef:
        body = self.statements(f.body, {a.name for a in f.args})
        return _locate(self.function_def(f.name, f.args, f.returns, body), f.line)

    @staticmethod
    def function_def(name: str, args: list[Param], returns: Optional[str], body: list[ast.stmt]) -> ast.FunctionDef:
        arguments = ast.arguments(
            posonlyargs=[],
            args=[ast.arg("self")] + [ast.arg(a.name, _annotation(a.type)) for a in args],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[_literal_node(a.default) for a in args if a.default is not _MISSING],
        )
        return ast.FunctionDef(name, arguments, body or [ast.Pass()], [], _annotation(returns))

    def statements(self, statements: list[Statement], scope: set[str]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in statements:
            if isinstance(s, Assign):
                value = self.expr(s.line, s.value, scope)
                if taken := [n for n in s.names if n in self.values or n in self.methods]:
                    self.error(s.line, f"cannot assign to layer member {taken[0]!r}; use a new local name")
                scope |= set(s.names)
                names = [ast.Name(n, ast.Store()) for n in s.names]
                node: ast.stmt = ast.Assign([names[0] if len(names) == 1 else ast.Tuple(names, ast.Store())], value)
            elif isinstance(s, Return):
                node = ast.Return(None if s.value is None else self.expr(s.line, s.value, scope))
            elif isinstance(s, Expression):
                node = ast.Expr(self.expr(s.line, s.value, scope))
            else:
                test = self.expr(s.line, s.test, scope)
                body, orelse = self.statements(s.body, scope), self.statements(s.orelse, scope)
                node = ast.If(test, body or [ast.Pass()], orelse)
            out.append(_locate(node, s.line))
        return out

    def expr(self, line: int, node: ast.expr, scope: set[str]) -> ast.expr:
        return _locate(_Resolver(self, line, scope).value(node), line)


_FORBIDDEN = {
    ast.Lambda: "lambda", ast.ListComp: "comprehension", ast.SetComp: "comprehension", ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension", ast.JoinedStr: "f-string", ast.NamedExpr: "':='", ast.Dict: "dict literal",
    ast.Set: "set literal", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
}  # fmt: skip


class _Resolver:
    """Checks one parsed expression against the allow-lists and rebuilds it with names resolved."""

    def __init__(self, builder: _Builder, line: int, scope: set[str]):
        self.builder, self.line, self.scope = builder, line, scope

    def error(self, message: str):
        self.builder.error(self.line, message)

    def value(self, node: ast.expr) -> ast.expr:
        if isinstance(node, (ast.Name, ast.Attribute)):
            ref = self.reference(node)
            if isinstance(ref, _Builtin):
                return ref.node()
            if isinstance(ref, _Method):
                self.error(f"method {ref.name!r} can only be called")
            if isinstance(ref, _Module):
                self.error(f"{ref.name!r} can only be used as {ref.name}.<function>")
            return ref
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, str, bool, type(None), type(Ellipsis)):
                self.error(f"{type(node.value).__name__} literals are not allowed")
            try:
                return ast.Constant(_check_constant(node.value))
            except ValueError as err:
                self.error(str(err))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Subscript):
            return ast.Subscript(self.operand(node.value, "subscript"), self.value(node.slice), ast.Load())
        if isinstance(node, ast.Slice):
            parts = (node.lower, node.upper, node.step)
            return ast.Slice(*(None if p is None else self.value(p) for p in parts))
        if isinstance(node, (ast.Tuple, ast.List)):
            return type(node)([self.value(e) for e in node.elts], ast.Load())
        if isinstance(node, ast.Starred):
            return ast.Starred(self.value(node.value), ast.Load())
        if isinstance(node, ast.BinOp):
            return ast.BinOp(self.value(node.left), type(node.op)(), self.value(node.right))
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(type(node.op)(), self.value(node.operand))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(type(node.op)(), [self.value(v) for v in node.values])
        if isinstance(node, ast.Compare):
            ops = [type(op)() for op in node.ops]
            return ast.Compare(self.value(node.left), ops, [self.value(c) for c in node.comparators])
        if isinstance(node, ast.IfExp):
            return ast.IfExp(self.value(node.test), self.value(node.body), self.value(node.orelse))
        what = _FORBIDDEN.get(type(node), "this syntax")
        self.error(f"{type(node).__name__} is not allowed in expressions ({what})")

    def reference(self, node: ast.expr) -> Union[ast.expr, _Builtin, _Method, _Module]:
        """What a name or attribute chain refers to: a value (as an ast node), a builtin, a method or a module."""
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if not isinstance(node, ast.Attribute):
            return self.value(node)
        if node.attr.startswith("_"):
            self.error(f"private attribute {node.attr!r} is not allowed")
        head = self.reference(node.value) if isinstance(node.value, (ast.Name, ast.Attribute)) else None
        if isinstance(head, _Module):
            allowed = _registry()[1][head.name]
            if node.attr not in allowed:
                self.error(f"{head.name}.{node.attr} is not allowed; allowed: {', '.join(sorted(allowed))}")
            return allowed[node.attr]
        base = self.operand(node.value, "attribute access", head)
        if node.attr not in ATTRIBUTES:
            self.error(f"attribute {node.attr!r} is not allowed (allowed attributes: bitcompile.layer_dsl.ATTRIBUTES)")
        return ast.Attribute(base, node.attr, ast.Load())

    def operand(self, node: ast.expr, what: str, ref=None) -> ast.expr:
        """The value an attribute or subscript applies to: never a literal, builtin, module or method."""
        if ref is None:
            ref = self.reference(node) if isinstance(node, (ast.Name, ast.Attribute)) else self.value(node)
        if isinstance(ref, ast.Constant) or isinstance(node, ast.Constant):
            self.error(f"{what} on a literal is not allowed")
        if isinstance(ref, (_Builtin, _Module)):
            name = ref.spelling if isinstance(ref, _Builtin) else ref.name
            self.error(f"{what} on the builtin {name!r} is not allowed")
        if isinstance(ref, _Method):
            self.error(f"{what} on the method {ref.name!r} is not allowed")
        return ref

    def name(self, name: str) -> Union[ast.expr, _Builtin, _Method, _Module]:
        if name in self.scope:
            return ast.Name(name, ast.Load())
        if name in _CONSTANTS:
            return ast.Constant(_CONSTANTS[name])
        if name in self.builder.values:
            return _self(name)
        if name in self.builder.methods:
            return _Method(name)
        bare, chains = _registry()
        if name in bare:
            return bare[name]
        if name in chains:
            return _Module(name)
        if name == "self":
            self.error("'self' is not part of the language: write member names directly ('weight', not 'self.weight')")
        layer = self.builder.layer.name
        self.error(f"unknown name {name!r} (not a local, argument, member of {layer}, or builtin)")

    def call(self, node: ast.Call) -> ast.Call:
        func = node.func
        if not isinstance(func, (ast.Name, ast.Attribute)):
            self.value(func)  # names what is wrong inside it first (a lambda, ...)
            self.error("only builtins, layer methods and methods of values can be called")
        ref = self.reference(func)
        if isinstance(ref, _Builtin):
            if not callable(ref.value):
                self.error(f"{ref.spelling} is not a function")
            target = ref.node()
        elif isinstance(ref, _Method):
            target = _self(ref.name)
        elif isinstance(ref, ast.Attribute) and isinstance(func, ast.Attribute):
            target = ref  # a method of a value, its name checked against ATTRIBUTES
        else:
            self.error(f"cannot call {_show(ast.unparse(func))}: only builtins, layer methods and methods of values")
        args = [self.value(a) for a in node.args]
        keywords = []
        for kw in node.keywords:
            if kw.arg is None:
                self.error("'**' arguments are not allowed")
            if kw.arg.startswith("_"):
                self.error(f"keyword argument {kw.arg!r} may not start with '_'")
            keywords.append(ast.keyword(kw.arg, self.value(kw.value)))
        return ast.Call(target, args, keywords)
