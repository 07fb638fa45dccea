"""What the matmul kernels compile to for the H100 (sm_90), checked without a GPU: the
structural facts their speed rests on. ``tools/inspect_kernels.py`` compiles every
shipped configuration with the installed Triton's NVIDIA backend in a separate process (this
one runs the kernels in the interpreter); skipped where that backend is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import sass  # noqa: E402  (tools/ is not a package: the inspection tool is not installed)

pytestmark = pytest.mark.skipif(not sass.available(), reason="Triton without its NVIDIA backend (ptxas)")
H100_SMEM_PER_BLOCK = 227 * 1024


@pytest.fixture(scope="module")
def profiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_kernels.py"), "--join-k", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows, "inspect_kernels printed no profiles"
    return rows


def row(profiles, key, **config):
    """The profile of shipped entry ``key`` (with ``config`` overrides such as JOIN_K=True)."""
    matches = (r for r in profiles if r["key"] == key and all(r["config"].get(k, False) == v for k, v in config.items()))
    return next(matches)


def test_gemv_loop_stays_in_registers(profiles):
    # Shared-memory transposes with barriers in every step were the GEMV's hidden cost
    # (8 shared-memory ops and 8 barriers per step before the full-shape operand tiles).
    stats = row(profiles, "ternary_mm:1,8192,8192")
    assert stats["smem"] == 0 and stats["bar"] == 0, stats
    cfg = stats["config"]
    words = cfg["BN"] * cfg["BW"] // (32 * cfg["num_warps"])  # weight words per thread and step
    assert stats["dp4a"] == 4 * words, stats  # one dp4a per quarter word
    # 16-byte loads: the weights, and the activations once per R rows (R = 4 is ~4% faster at
    # 8192^2 than R = 1)
    assert stats["ldg128"] == words // 4 + words // cfg.get("R", 1), stats
    # The prmt tables stay in registers (pair_tables_in_registers): with them re-materialised
    # before every prmt, this loop took 227 instructions for its 64 dp4a.
    assert stats["loop_instructions"] <= 3 * stats["dp4a"], stats


def test_gemm_unpack_cost_and_one_tensor_core_wait_per_block(profiles):
    stats = row(profiles, "ternary_mm:8192,8192,8192", JOIN_K=True)
    cfg = stats["config"]
    trits_per_thread = cfg["BN"] * 256 // (32 * cfg["num_warps"])
    # Word-wide unpacking (4 trits per register op) and no load masks: ~2.3 instructions
    # per trit and thread per step; Triton's byte-wise int8 unpack with masks took ~8.
    assert stats["loop_instructions"] <= 3 * trits_per_thread, stats
    assert stats["mma_wait"] == 1 and stats["mma"] > 0 and stats["cp_async"] > 0, stats


def test_shipped_configs_fit_the_h100(profiles):
    """The shipped launch configurations (used without being timed again) still compile
    without spills into the H100's shared memory after kernel changes."""
    bad = [r for r in profiles if r["spill_bytes"] or r["smem_bytes"] > H100_SMEM_PER_BLOCK]
    assert not bad, bad
    assert {r["key"].split(":")[0] for r in profiles} == {"ternary_mm", "grad_input"}


def test_wgmma_matmul_waits_once_per_step(profiles):
    """The Gluon kernel's point: one tensor-core wait per step (its MMAs then overlap the next
    step's decode), and few barriers (each TMA copy costs one)."""
    import triton

    stats = row(profiles, "ternary_mm:16,8192,8192")
    cfg = stats["config"]
    assert cfg["kernel"] == "wgmma" and stats["mma"] == 8 * cfg["NB"], stats  # 2 k32 MMAs per quarter
    if triton.__version__.startswith("3.6"):
        assert stats["mma_wait"] == 1 and stats["bar"] <= 4, stats
    else:  # seen with Triton 3.9 (no GPU here to time it): ptxas waits after every MMA
        pytest.skip(f"Triton {triton.__version__} serialises the kernel's MMAs ({stats['mma_wait']} waits per step)")


def test_grad_input_ws_keeps_one_mma_in_flight(profiles):
    """The warp-specialised input gradient's MMA warps: a step's 4 wgmma (out^T, BK 128 / BM 256:
    one m64n256 block per warpgroup, four k16) and one wait, for the step before, per step; the
    accumulator in the launch's 168 registers without spills."""
    stats = row(profiles, "grad_input:8192,8192,8192,torch.bfloat16")
    assert stats["config"]["layout"] == "ws", stats
    assert stats["mma"] == 4 and stats["mma_wait"] == 1 and stats["spill_bytes"] == 0, stats
    assert stats["regs"] <= 168, stats


# Compiled in a fresh process (this one imports the kernels for the interpreter).
CONV_AND_SAMPLE_QUANT = """
import json, sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import conv, sample_quant
args = dict(X="*i8", P="*u8", C="*bf16", XS="*fp32", WS="*fp32", BIAS="*bf16", ROWS=100352, CIN=64, H=56, W=56,
            OH=56, OW=56, CIN_G=64, COUT_G=64, PB=144, TAPB=16, CSTEPS=1, s_on=200704, s_oc=1, s_oh=3584, s_ow=64,
            stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
for cfg in conv._configs():
    c = dict(cfg)
    warps = c.pop("num_warps")
    flags = dict(KH=3, KW=3, EPILOGUE=True, PER_CHANNEL=False, HAS_BIAS=False, USE_ASM=True, **c)
    print(json.dumps(dict(config=cfg, **sass.profile(conv._conv_kernel, args, flags, warps, 1))))
sass.compile_sm90(sample_quant._absmax_kernel, dict(X="*bf16", AMAX="*i32", E=200704, PER=8192), dict(BLOCK=2048), 4, 3)
sass.compile_sm90(sample_quant._quantize_kernel, dict(X="*bf16", AMAX="*i32", Q="*i8", S="*fp32", C=64, P=3136,
                     s_xn=200704, s_xc=1, s_xp=64, qmax=127.0), dict(BC=64, BP=64, USE_ASM=True), 4, 3)
"""


def test_conv_tiles_and_per_sample_quantization_compile_for_the_h100():
    """Every conv tile the tuner may pick fits the H100 without spills and fetches its
    channels-last activation tiles by ``cp.async`` (16-byte runs); the per-sample quantization
    kernels compile (the interpreter accepts module globals a compile rejects)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = CONV_AND_SAMPLE_QUANT.replace("{tools!r}", repr(str(ROOT / "tools")))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) >= 5
    for r in rows:
        assert not r["spill_bytes"] and r["smem_bytes"] <= H100_SMEM_PER_BLOCK, r
    assert all(r["cp_async"] > 0 for r in rows if r["loop_instructions"]), rows
