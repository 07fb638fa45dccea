"""Device helpers shared by several kernels (``bitcompile/kernels/common.py``): the trit unpacking that the
conv and the canonical input-gradient kernel inline, run by the PTX interpreter (tests/kernels/ptx.py)."""

import numpy as np
import pytest

from bitcompile.kernels.common import TRITS_PTX
from tests.kernels.ptx import run_ptx


@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_trits_ptx(shift):
    rng = np.random.default_rng(shift)
    for word in rng.integers(0, 2**32, 2000, dtype=np.uint64).tolist():
        out = run_ptx(TRITS_PTX.value, {"$1": word, "$2": shift})["$0"]
        for byte in range(4):
            want = (((word >> 8 * byte) >> shift) & 3) - 1
            assert (out >> 8 * byte) & 255 == want & 255, (hex(word), shift, byte)
