"""What the kernels compile to for the H100 (sm_90), checked without a GPU: helpers of the machine-code
tests in each kernel's test file. ``tools/inspect_kernels.py`` compiles every shipped configuration with
the installed Triton's NVIDIA backend in a separate process (the test process runs the kernels in the
interpreter); the tests are skipped where that backend is missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import sass  # noqa: E402  (tools/ is not a package: the inspection tool is not installed)

needs_ptxas = pytest.mark.skipif(not sass.available(), reason="Triton without its NVIDIA backend (ptxas)")
H100_SMEM_PER_BLOCK = 227 * 1024


def compiler_env() -> dict:
    """This process's environment without TRITON_INTERPRET: a child process compiles the kernels."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def shipped_profiles() -> list:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "inspect_kernels.py"), "--join-k", "--json"],
        env=compiler_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows, "inspect_kernels printed no profiles"
    return rows


def row(profiles, key, **config):
    """The profile of shipped entry ``key`` (with ``config`` overrides such as JOIN_K=True)."""
    matches = (
        r for r in profiles if r["key"] == key and all(r["config"].get(k, False) == v for k, v in config.items())
    )
    return next(matches)


def compile_in_child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process that compiles (``tools`` importable as ``{tools!r}``)."""
    code = code.replace("{tools!r}", repr(str(ROOT / "tools")))
    return subprocess.run([sys.executable, "-c", code], env=compiler_env(), capture_output=True, text=True)
