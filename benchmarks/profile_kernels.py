"""One matmul call per M (1, 16, 128, 8192 at 8192², the shipped configurations) for Nsight
Compute (``ncu``) to profile; each kernel is compiled before the profiled launch.

    ncu --clock-control none -k regex:'_gemv_kernel|_gemm_kernel' --set full \\
        python3 benchmarks/profile_kernels.py [M ...]
"""

import sys

import torch

import bitcompile.ops  # noqa: F401
from bitcompile.kernels.layout import relayout
from bitcompile.kernels.ternary_matmul import ternary_matmul
from bitcompile.numerics import reference as ref

n = k = 8192
wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda"))
blocked = relayout(wq, k)
for m in [int(v) for v in sys.argv[1:]] or [1, 16, 128, 8192]:
    xq, xs = ref.quantize_activations(torch.randn(m, k, device="cuda"))
    # No warm-up launch: the first call compiles (no kernel launched before it), so ncu's
    # launch filter sees exactly one launch per M.
    ternary_matmul(xq, blocked, k, xs, ws, None, torch.bfloat16, layout="kblocked")
torch.cuda.synchronize()
