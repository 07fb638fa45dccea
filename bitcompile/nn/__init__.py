"""Eager layers built on the ``bitnet`` ops.

* ``BitLinear``, ``BitConv1d``, ``BitConv2d``: exactly what the backend compiles a linear or
  conv to (BitNet b1.58 semantics, same ops): drop-ins for ``nn.Linear`` / ``nn.Conv*d`` and
  the references compiled models are tested against; ``reference_model(model)`` swaps them
  (and the attention equivalents) into a copy of a whole model.
* ``TernaryConv2d`` (learned per-channel thresholds and scales) and
  ``TernaryMultiheadAttention`` (fused ternary QKV, returned attention maps, heatmaps):
  research layers with their own quantizers, not what the backend emits.
* ``PackedLinear``: only the packed weights and scales of a quantized linear, for deployment
  (``bitcompile.deploy``, ``bitcompile.load_packed(..., deploy=True)``); inference only.
* ``W8A16Linear``: int8 weights with per-channel scales and float activations, for the
  model-level ``bitcompile.Quantizer``.
"""

from bitcompile.nn.bit_conv import BitConv1d, BitConv2d
from bitcompile.nn.bit_linear import BitLinear
from bitcompile.nn.learned_ternary_conv import TernaryConv2d
from bitcompile.nn.packed_linear import PackedLinear
from bitcompile.nn.reference_model import reference_model
from bitcompile.nn.ternary_attention import TernaryMultiheadAttention
from bitcompile.nn.w8a16 import W8A16Linear, W8A16LinearLayer

__all__ = [
    "BitLinear",
    "BitConv1d",
    "BitConv2d",
    "reference_model",
    "TernaryConv2d",
    "TernaryMultiheadAttention",
    "PackedLinear",
    "W8A16Linear",
    "W8A16LinearLayer",
]
