"""The ``bitnet`` ops: one definition of every quantizer, shared by the eager layers
(``bitcompile.nn``) and the compiled graphs (``bitcompile.passes``)."""
from bitcompile.ops import conv_attention, cuda, fused, reference  # noqa: F401  (each registers its ops)
from bitcompile.ops.library import (
    dequantize,
    grad_input,
    lowbit_linear,
    lowbit_matmul,
    quantize_activations,
    quantize_weights,
)
from bitcompile.ops.weight_cache import WEIGHT_CACHE, WeightCache

__all__ = [
    "reference",
    "quantize_activations",
    "quantize_weights",
    "lowbit_matmul",
    "dequantize",
    "lowbit_linear",
    "grad_input",
    "WeightCache",
    "WEIGHT_CACHE",
]
