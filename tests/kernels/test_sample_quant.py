"""The per-sample activation quantization (``bitcompile/kernels/sample_quant.py``: one scale per sample,
channels-last int8 codes, the conv's input) against the plain-torch reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.codegen import compile_in_child, needs_ptxas
from tests.kernels.support import DTYPES

ops = torch.ops.bitnet


@given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    size=st.integers(1, 40),
    spatial=st.sampled_from([1, 2]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    bits=st.sampled_from([8, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    nan=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_per_sample_quantization_equals_reference(kernels, device, n, c, size, spatial, layout, bits, dtype, nan, seed):
    """Both launches (sliced absmax with an atomic max on the float bits, then quantize into the
    channels-last integers) against the reference: integers and scales exactly, NaN samples
    included, from contiguous, channels-last and strided inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, c, *([size] * spatial), generator=g)
        * 10 ** torch.randn(n, *([1] * spatial), generator=g).unsqueeze(1)
    ).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    if nan:  # in the last sample, after the layout change (a strided view must not skip it)
        x[(-1, c // 2) + (size // 2,) * spatial] = float("nan")
    want_q, want_s = ref.quantize_activations_per_sample(x, bits)
    q, s = kernels.sample_quant.quantize_per_sample(x.to(device), bits)
    assert q.stride() == want_q.stride() == ref.channels_last_empty(x, torch.int8).stride()  # as the fake kernel's
    assert torch.equal(q.cpu(), want_q)
    torch.testing.assert_close(s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
    assert s.isnan().any() == nan


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).


# Compiled in a fresh process (this one imports the kernels for the interpreter).
SAMPLE_QUANT = """
import sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import sample_quant
sass.compile_sm90(sample_quant._absmax_kernel, dict(X="*bf16", AMAX="*i32", E=200704, PER=8192), dict(BLOCK=2048),
                  4, 3)
sass.compile_sm90(sample_quant._quantize_kernel, dict(X="*bf16", AMAX="*i32", Q="*i8", S="*fp32", C=64, P=3136,
                     s_xn=200704, s_xc=1, s_xp=64, qmax=127.0), dict(BC=64, BP=64, USE_ASM=True), 4, 3)
"""


@needs_ptxas
def test_per_sample_quantization_compiles_for_the_h100():
    """Both per-sample quantization kernels compile for sm_90 (the interpreter accepts module
    globals a compile rejects)."""
    out = compile_in_child(SAMPLE_QUANT)
    assert out.returncode == 0, out.stderr[-3000:]


# GPU only (make test-gpu): realistic shapes, compiled kernels.


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_quantization_on_cuda(dtype, layout):
    # The two-launch kernel (sliced absmax, channels-last integers) at ResNet sizes, one sample
    # with a NaN and samples of very different magnitudes, against the CPU reference exactly.
    x = torch.randn(8, 64, 56, 56, device="cuda") * torch.logspace(-3, 3, 8, device="cuda")[:, None, None, None]
    x = x.to(dtype).contiguous(memory_format=layout)
    x[3, 5, 7, 9] = float("nan")
    q, s = ops.quantize_activations_per_sample(x, 8)
    want_q, want_s = ref.quantize_activations_per_sample(x.cpu(), 8)
    assert q.stride() == want_q.stride() and torch.equal(q.cpu(), want_q)
    torch.testing.assert_close(s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
    assert s.isnan().sum() == 1
