"""The node targets the passes match, after ``normalize`` has rewritten every other spelling
to these (one target per operation), so a matcher compares with one set.

``SPELLINGS`` is what ``normalize`` rewrites: for each canonical target, the functions
(torch, ``torch.nn.functional``, aten) and tensor methods that compute the same thing.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

aten = torch.ops.aten

# Canonical targets.
LINEAR = F.linear  # = torch._C._nn.linear: (x, weight, bias)
ADD, SUB, MUL, DIV, POW, MATMUL = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    operator.matmul,
)
BMM = torch.bmm
RELU, GELU, SILU, SQUARE = torch.relu, F.gelu, F.silu, torch.square
RSQRT, MEAN = torch.rsqrt, torch.mean
TRANSPOSE_2D = torch.t
TRANSPOSE = torch.transpose
CAST = "to"  # the tensor method; casts stay method calls
RMS_NORM, LAYER_NORM, BATCH_NORM = F.rms_norm, F.layer_norm, F.batch_norm
CONV = {torch.conv1d: 1, torch.conv2d: 2}
SDPA = F.scaled_dot_product_attention
SOFTMAX = torch.softmax
DROPOUT = F.dropout
EMBEDDING = F.embedding
MHA = F.multi_head_attention_forward
ENCODER_LAYER_FAST_PATH = torch._transformer_encoder_layer_fwd

# Other spellings of binary operators and element-wise functions, rewritten to the canonical
# target when called exactly as ``f(a, b)`` / ``f(x)`` (no alpha=, out=, inplace=True, ...).
FUNCTION_SPELLINGS = {
    ADD: (torch.add, aten.add.Tensor),
    SUB: (torch.sub, aten.sub.Tensor),
    MUL: (torch.mul, aten.mul.Tensor),
    DIV: (torch.div, torch.true_divide, aten.div.Tensor),
    POW: (torch.pow, aten.pow.Tensor_Scalar),
    MATMUL: (torch.matmul, aten.matmul.default),
    BMM: (aten.bmm.default,),
    RELU: (F.relu, aten.relu.default),
    SILU: (torch._C._nn.silu, aten.silu.default),
    RSQRT: (aten.rsqrt.default,),
    SQUARE: (aten.square.default,),
    RMS_NORM: (torch.rms_norm,),
    LAYER_NORM: (torch.layer_norm,),
    SDPA: (aten.scaled_dot_product_attention.default,),
    SOFTMAX: (F.softmax, aten.softmax.int),
    EMBEDDING: (torch.embedding, aten.embedding.default),
    LINEAR: (aten.linear.default,),
    torch.conv1d: (aten.conv1d.default,),
    torch.conv2d: (aten.conv2d.default,),
}
# Tensor methods computing a canonical function of ``self`` and the same arguments.
METHOD_SPELLINGS = {
    "add": ADD,
    "__add__": ADD,
    "sub": SUB,
    "mul": MUL,
    "__mul__": MUL,
    "div": DIV,
    "__truediv__": DIV,
    "pow": POW,
    "matmul": MATMUL,
    "__matmul__": MATMUL,
    "bmm": BMM,
    "relu": RELU,
    "square": SQUARE,
    "rsqrt": RSQRT,
    "mean": MEAN,
    "t": TRANSPOSE_2D,
    "transpose": TRANSPOSE,
    "softmax": SOFTMAX,
}
# Keyword arguments that change what a spelling computes: a call using them keeps its spelling.
CHANGING_KWARGS = {"alpha", "out", "rounding_mode", "inplace", "approximate"}
