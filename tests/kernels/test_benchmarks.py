"""The GPU benchmark scripts run end to end (``--smoke``: tiny shapes, on the CPU here), so a
GPU round is not spent finding a broken script. Checks what they print, not their timings."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def smoke(script: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_kernels_smoke(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    printed = smoke("bench_kernels.py", "--out", str(out))
    table = out.read_text()
    assert "smoke run" in table
    # one matmul row per M, the QAT row (with the int8-gradient column) and its rows for the other
    # launch modes (CUDA graphs, C++ wrapper), conv and decode lines
    assert [line.split("|")[1].strip() for line in table.splitlines() if "| 64×96 |" in line] == ["1", "16", "40"]
    qat = [line for line in table.splitlines() if line.startswith("| 64×64 |")]
    assert [len(line.split("|")) for line in qat] == [11, 8, 8]
    assert [line.split("|")[2].strip() for line in qat[1:]] == ["CUDA graphs", "C++ wrapper"]
    assert "Host overhead" in table and "Compiled decode" in table
    conv = [line.split("|")[2].strip() for line in table.splitlines() if "3×3/1 |" in line]
    assert conv == ["NCHW", "NHWC"]
    assert "C++ wrapper (`cpp_wrapper`)" in table
    assert all("nan" not in line and line in printed for line in qat)


def test_profile_qat_smoke():
    printed = smoke("profile_qat.py")
    for label in ("bitnet ops", "backend=bitnet,", "grad_input_bits=8", "Inductor fake-quant"):
        assert f"{label}" in printed
    assert printed.count("wall time per step") == 4


def test_sweep_norm_quant_smoke():
    printed = smoke("sweep_norm_quant.py")
    assert "copy bandwidth" in printed
    none, rms = (printed.count(f"8x64 {kind}") for kind in ("none", "rms "))
    assert none == rms >= 5  # the same warp counts for both norm kinds
    assert printed.count("(launcher's)") == 2


def test_sweep_matmul_smoke():
    printed = smoke("sweep_matmul.py")
    assert "exact=False" not in printed and printed.count("exact=True") >= 9
    assert printed.count("int8 GEMM exact vs torch: True") == 2


def test_read_floor_smoke():
    printed = smoke("read_floor.py")
    assert "copy bandwidth" in printed and printed.count("read ") == 1  # results checked inside


def test_bench_grad_input_smoke():
    printed = smoke("bench_grad_input.py")
    assert "cuBLAS" in printed and "equal to transposed: False" not in printed
    assert printed.count("equal to transposed: True") == 2  # canonical and transposed (no Gluon on the CPU)
