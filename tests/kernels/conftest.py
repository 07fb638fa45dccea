"""Kernel tests: one file per module of ``bitcompile/kernels``, its interpreter and GPU cases together.

Where a test's kernels run is the ``device`` it is parametrized over. TRITON_INTERPRET is read when a kernel
is decorated, so one process has one device: without CUDA (or with TRITON_INTERPRET=1) the Triton
interpreter on CPU tensors (id ``interpreter``, tensors on "cpu"), else the compiled kernels on "cuda".
``@pytest.mark.devices("interpreter")`` limits a test to the devices named (elsewhere it is collected and
skipped). GPU-only tests (realistic shapes, compiled code, Inductor) are marked ``gpu`` and use "cuda".

Nothing outside tests/kernels imports the kernel modules on the CPU; ``kernels`` imports them after
TRITON_INTERPRET is set, so the rest of the suite is unaffected.
"""

import importlib
import os

import pytest
import torch

from tests.kernels import codegen

DEVICES = {"interpreter": "cpu", "cuda": "cuda"}  # device id -> where the test's tensors live


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(*ids): kernel devices the test makes sense on (interpreter, cuda)")


def device_here() -> str:
    """The device id this process runs the kernels on."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    return "interpreter" if interpreted else "cuda"


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    here = device_here()
    marker = metafunc.definition.get_closest_marker("devices")
    allowed = marker.args if marker else tuple(DEVICES)
    marks = [] if here in allowed else [pytest.mark.skip(reason=f"runs on {', '.join(allowed)} only")]
    metafunc.parametrize("device", [pytest.param(here, id=here, marks=marks)], indirect=True, scope="module")


@pytest.fixture(scope="module")
def device(request):
    """The torch device of a kernel test's tensors."""
    return DEVICES[request.param]


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
        int8_weight_matmul = importlib.import_module("bitcompile.kernels.int8_weight_matmul")
        weight_pack_group = importlib.import_module("bitcompile.kernels.weight_pack_group")

    return Modules


@pytest.fixture(scope="session")
def profiles():
    """sm_90 profiles of every shipped launch configuration (``codegen.shipped_profiles``), compiled
    once per session: the machine-code tests of several kernels read them."""
    return codegen.shipped_profiles()
