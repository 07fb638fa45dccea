"""FX graph rewrites, one pattern family per module, run in order by ``manager.run_passes``."""

from bitcompile.passes.context import HoistedWeight, PassContext
from bitcompile.passes.manager import PASSES, run_passes

__all__ = ["HoistedWeight", "PassContext", "PASSES", "run_passes"]
