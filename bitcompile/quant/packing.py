"""Deprecated alias: the packed formats live in ``bitcompile.numerics.packing``
(``pack_ternary`` and ``unpack_ternary`` are also exported by ``bitcompile.quant``)."""

import warnings

from bitcompile.numerics.packing import *  # noqa: F401,F403

warnings.warn("bitcompile.quant.packing is now bitcompile.numerics.packing", DeprecationWarning, stacklevel=2)
