"""Eager layers built on the ``bitnet`` ops (the references the compiled paths are tested against)."""
from bitcompile.nn.bit_linear import BitLinear
from bitcompile.nn.bit_conv import BitConv1d, BitConv2d
from bitcompile.nn.reference_model import reference_model
from bitcompile.nn.ternary_conv import TernaryConv2d
from bitcompile.nn.ternary_attention import TernaryMultiheadAttention
from bitcompile.nn.w8a16 import W8A16Linear, W8A16LinearLayer

__all__ = ["BitLinear", "BitConv1d", "BitConv2d", "reference_model", "TernaryConv2d", "TernaryMultiheadAttention", "W8A16Linear", "W8A16LinearLayer"]
