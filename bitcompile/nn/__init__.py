"""Eager layers built on the ``bitnet`` ops (the references the compiled paths are tested against)."""
from bitcompile.nn.bit_linear import BitLinear

__all__ = ["BitLinear"]
