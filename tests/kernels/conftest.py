"""Kernel tests: without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set (per test module) before the test imports ``bitcompile.kernels.*``; nothing outside
tests/kernels imports those modules on the CPU, so the rest of the suite is unaffected.
"""
import importlib
import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    if torch.cuda.is_available():
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="module")
def kernels(_triton_interpreter):
    """The kernel modules, imported after TRITON_INTERPRET is set."""

    class Modules:
        act_quant = importlib.import_module("bitcompile.kernels.act_quant")
        weight_pack = importlib.import_module("bitcompile.kernels.weight_pack")
        ternary_matmul = importlib.import_module("bitcompile.kernels.ternary_matmul")
        grad_input = importlib.import_module("bitcompile.kernels.grad_input")
        layout = importlib.import_module("bitcompile.kernels.layout")
        conv = importlib.import_module("bitcompile.kernels.conv")
        sample_quant = importlib.import_module("bitcompile.kernels.sample_quant")

    return Modules


@pytest.fixture(scope="module")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
