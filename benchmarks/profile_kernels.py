"""A few matmul calls for Nsight Compute (``ncu``) to profile: M=1 (GEMV) and M=16 (GEMM) at 8192².

    ncu --kernel-name regex:_gemv_kernel\\|_gemm_kernel --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis python3 benchmarks/profile_kernels.py
"""
import torch

import bitcompile.ops  # noqa: F401
from bitcompile.ops import reference as ref

ops = torch.ops.bitnet
n = k = 8192
wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda"))
for m in (1, 16):
    xq, xs = ref.quantize_activations(torch.randn(m, k, device="cuda"))
    for _ in range(4):
        ops.linear_q(xq, xs, wq, ws, None, k, torch.bfloat16, "none", None)
torch.cuda.synchronize()
