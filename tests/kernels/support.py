"""Strategies, constants and checks shared by the kernel test files."""

import torch
from hypothesis import strategies as st

# Interpreter shapes: non-multiples of the block sizes (16/32/64) and of 4.
dims = st.integers(1, 70)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]  # GPU tests: every activation dtype


def near_half(v: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Where ``v`` lies within ``tol`` of a rounding boundary (x.5)."""
    return ((v - v.floor()) - 0.5).abs() < tol


def gpu_configs(build, *args):
    """What ``build`` lists on a GPU: every launch configuration a GPU's tuner may pick (with
    the interpreter each kernel lists one or a few small tiles, and the GPU suite runs them all
    only when a GPU round does)."""
    from unittest import mock

    from bitcompile.kernels import tuning

    with mock.patch.object(tuning, "interpreting", lambda: False):
        return build(*args)
