import os

import pytest
import torch

# Without CUDA, Triton kernels run in the interpreter. TRITON_INTERPRET is read when a
# kernel is decorated (at import), so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ISOLATE=1 benchmarks/gpu_round.sh test: each pytest-xdist worker compiles into caches of its own
# (Inductor, Triton, tuning), which tells shared on-disk caches apart from GPU contention when a
# test fails only under concurrent workers.
if os.environ.get("BITCOMPILE_TEST_PRIVATE_CACHES") and os.environ.get("PYTEST_XDIST_WORKER"):
    _root = os.path.join(os.environ["BITCOMPILE_TEST_PRIVATE_CACHES"], os.environ["PYTEST_XDIST_WORKER"])
    for _var, _sub in (
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"),
        ("BITCOMPILE_CACHE_DIR", "tuning"),
    ):
        os.environ[_var] = os.path.join(_root, _sub)
from hypothesis import HealthCheck, settings

# ci: derandomized and bounded so `make test` stays well inside the CI budget.
# dev: more examples, random seeds, for local bug hunting.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and starts with an empty weight cache."""
    import bitcompile.ops

    torch._dynamo.reset()
    bitcompile.ops.WEIGHT_CACHE.clear()
    yield
    torch._dynamo.reset()


def poison_cached_memory() -> None:
    """Leave the caching allocator's free blocks (both pools: small <= 1 MB, large) full of NaN
    bytes, so a kernel that reads memory nothing wrote (an unwritten ``torch.empty``) shows
    non-finite values in one process as it would late in a long one (fresh pages read as 0)."""
    sizes = [1 << 18] * 32 + [5 << 20] * 16  # fp32 elements: 1 MB blocks, 20 MB blocks
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    del blocks


@pytest.fixture(autouse=True)
def _poisoned_gpu_memory(request):
    """GPU tests start from NaN-filled free memory (``poison_cached_memory``)."""
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        poison_cached_memory()
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (run `make test-gpu` on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
