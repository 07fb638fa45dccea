"""The ``bitnet`` ops: one definition of every quantized computation, shared by the eager
layers (``bitcompile.nn``) and the compiled graphs (``bitcompile.passes``).

One module per op family, each holding its custom ops, fake and autograd rules, CUDA kernel
dispatch, ``*kernel_supports`` predicates and Inductor-visible ``*_triton`` twins:
``quantize`` (activations, weights), ``linear`` (the packed matmul and its STE),
``norm_quant`` (norm + activation quantization), ``epilogue`` (inference linears with fused
activation / residual), ``conv`` and ``attention``. ``weight_cache`` serves packed weights to
inference graphs.
"""

from bitcompile.ops import attention, conv, epilogue, linear, norm_quant, quantize  # noqa: F401  (register the ops)
from bitcompile.ops.linear import dequantize, grad_input, lowbit_linear, lowbit_matmul
from bitcompile.ops.quantize import quantize_activations, quantize_weights
from bitcompile.ops.weight_cache import WEIGHT_CACHE, WeightCache

__all__ = [
    "quantize_activations",
    "quantize_weights",
    "lowbit_matmul",
    "dequantize",
    "lowbit_linear",
    "grad_input",
    "WeightCache",
    "WEIGHT_CACHE",
]
