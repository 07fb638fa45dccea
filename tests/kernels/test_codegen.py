"""What the matmul kernels compile to for the H100 (sm_90), checked without a GPU: the
structural facts their speed rests on. Compiled with the installed Triton's NVIDIA backend
(``bitcompile.kernels.codegen``); skipped where that backend is missing."""
import json

import pytest

from bitcompile.kernels import codegen, tuning

pytestmark = pytest.mark.skipif(not codegen.available(), reason="Triton without its NVIDIA backend (ptxas)")
SHIPPED = json.loads((tuning.SHIPPED_DIR / "NVIDIA_H100_80GB_HBM3.json").read_text())
H100_SMEM_PER_BLOCK = 227 * 1024


def shipped(m: int, n: int, k: int) -> dict:
    return SHIPPED[f"ternary_mm:{m},{n},{k}"]


def test_gemv_loop_stays_in_registers():
    # Shared-memory transposes with barriers in every step were the GEMV's hidden cost
    # (8 shared-memory ops and 8 barriers per step before the full-shape operand tiles).
    stats = codegen.profile(*codegen.ternary_mm_case(shipped(1, 8192, 8192), 1, 8192, 8192))
    assert stats["smem"] == 0 and stats["bar"] == 0, stats
    assert stats["ldg128"] >= 1 and stats["dp4a"] >= 16, stats  # 16-byte weight loads, dp4a math


def test_gemm_unpack_cost_and_one_tensor_core_wait_per_block():
    cfg = dict(shipped(8192, 8192, 8192), JOIN_K=True)
    stats = codegen.profile(*codegen.ternary_mm_case(cfg, 8192, 8192, 8192))
    trits_per_thread = cfg["BN"] * 256 // (32 * cfg["num_warps"])
    # Word-wide unpacking (4 trits per register op) and no load masks: ~2.3 instructions
    # per trit and thread per step; Triton's byte-wise int8 unpack with masks took ~8.
    assert stats["loop_instructions"] <= 3 * trits_per_thread, stats
    assert stats["mma_wait"] == 1 and stats["mma"] > 0 and stats["cp_async"] > 0, stats


@pytest.mark.parametrize("key", sorted(k for k in SHIPPED if k.startswith(("ternary_mm:", "grad_input:"))))
def test_shipped_configs_fit_the_h100(key):
    """The shipped launch configurations still compile without spills into the H100's shared
    memory after kernel changes (they are used without being timed again)."""
    kernel, _, rest = key.partition(":")
    m, n, k = (int(v) for v in rest.split(",")[:3])
    if kernel == "grad_input":
        dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[rest.split(",")[3]]
        cases = [codegen.grad_input_case(SHIPPED[key], m, n, k, dtype)]
    else:
        gemm = SHIPPED[key]["kernel"] == "gemm"
        cases = [codegen.ternary_mm_case(c, m, n, k) for c in [SHIPPED[key]] + [dict(SHIPPED[key], JOIN_K=True)] * gemm]
    for case in cases:
        stats = codegen.profile(*case)
        assert stats["spill_bytes"] == 0 and stats["smem_bytes"] <= H100_SMEM_PER_BLOCK, (case[2], stats)
