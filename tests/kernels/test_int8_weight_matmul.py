"""The weight-only int8 matmul (``bitcompile/kernels/int8_weight_matmul.py``: the GEMV and the tensor-core
GEMM) and the ops that route float-activation, int8-weight linears to it, against the plain-torch reference.

Tolerance: the codes convert exactly and each product ``x * w`` is exact in float32 (a 16-bit ``x`` times
an integer below 2^7), so the kernel and the reference differ only in the order of the float32 sums over K
(each partial sum off by at most K ulps of the sum of magnitudes: ``K * 2^-24 * sum |x| |w|``, doubled for
the two orders), then by the rounding of the output dtype (half an ulp: 2^-11 relative for float16, 2^-8
for bfloat16, 2^-24 for float32).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.codegen import compile_in_child, needs_ptxas
from tests.kernels.support import dims, gpu_configs

UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def operands(m, n, k, dtype, per_channel, bias, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    codes, scale = ref.quantize_weights(torch.randn(n, k, generator=g), "int8", per_channel)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t.to(device) if t is not None else None for t in (x, codes, scale, b)]


def assert_within_summation_order(got, x, codes, scale, bias):
    """``got`` against the reference, to the bound of the module docstring."""
    x, codes, scale = x.cpu(), codes.cpu(), scale.cpu()
    want = ref.lowbit_linear(x, None if bias is None else bias.cpu(), None, None, codes, scale, x.shape[-1])
    k = x.shape[-1]
    magnitude = (x.abs().float() @ codes.abs().float().t()) * scale.reshape(1, -1).abs()
    bound = 2 * k * 2.0**-24 * magnitude + 2 * UNIT[x.dtype] * want.float().abs() + 1e-30
    error = (got.cpu().float() - want.float()).abs()
    assert got.dtype == x.dtype and bool((error <= bound).all()), (error - bound).max().item()


@pytest.mark.parametrize("m", [1, 3, 8, 17, 40])  # GEMV (1 row); tensor-core GEMM (16-, 64-row tiles)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # (the interpreter has no bfloat16)
def test_every_config_matches_the_reference(kernels, device, m, dtype, monkeypatch):
    """Every launch configuration a GPU's tuner may pick, at a partial row tile, a partial K slice and a
    partial weight tile (N = 40, K = 298): per-channel scales with a bias, a per-tensor scale without."""
    mod = kernels.int8_weight_matmul
    configs = gpu_configs(mod.candidates, m)
    assert len(configs) >= 5 and all(c["GEMV"] == (m == 1) for c in configs)
    for per_channel, bias in ((True, True), (False, False)):
        x, codes, scale, b = operands(m, 40, 298, dtype, per_channel, bias, seed=m, device=device)
        for cfg in configs:
            monkeypatch.setattr(mod.tuning, "choose", lambda *args, cfg=cfg: cfg)
            assert_within_summation_order(mod.int8_weight_matmul(x, codes, scale, b), x, codes, scale, b)


@given(m=st.integers(1, 20), n=dims, k=dims, per_channel=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
def test_any_shape_matches_the_reference(kernels, device, m, n, k, per_channel, bias, seed):
    x, codes, scale, b = operands(m, n, k, torch.float32, per_channel, bias, seed, device)
    assert_within_summation_order(kernels.int8_weight_matmul.int8_weight_matmul(x, codes, scale, b), x, codes, scale, b)


def test_leading_dims_empty_operands_and_bad_input(kernels, device):
    f = kernels.int8_weight_matmul.int8_weight_matmul
    x, codes, scale, b = operands(6, 5, 7, torch.float32, True, True, seed=0, device=device)
    flat = f(x, codes, scale, b)
    assert torch.equal(f(x.reshape(2, 3, 7), codes, scale, b), flat.reshape(2, 3, 5))
    assert f(x[:0], codes, scale, b).shape == (0, 5)
    assert torch.equal(f(x[:, :0], codes[:, :0], scale, b).cpu(), b.cpu().expand(6, 5))  # K = 0: the bias
    with pytest.raises(TypeError, match="needs int8 weights"):
        f(x, codes.float(), scale)
    with pytest.raises(ValueError, match="float activations"):
        f(x[:, :6], codes, scale)
    with pytest.raises(ValueError, match="1 or 5 scales"):
        f(x, codes, scale[:2])


def test_a_cached_configuration_that_is_no_candidate_is_not_launched(kernels, device, monkeypatch):
    """A GEMV entry (one row) cached for 3 rows, as another version could have tuned it: the
    heuristic runs instead and the rows are right."""
    mod = kernels.int8_weight_matmul
    stale = dict(GEMV=True, BN=16, BK=256, num_warps=4, num_stages=1)
    monkeypatch.setattr(mod.tuning, "choose", lambda *args: stale)
    x, codes, scale, b = operands(3, 40, 298, torch.float32, True, True, seed=3, device=device)
    assert_within_summation_order(mod.int8_weight_matmul(x, codes, scale, b), x, codes, scale, b)


# --- Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py) ----------

INT8_MATMUL = """
import sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import int8_weight_matmul as iw
args = dict(X="*bf16", W="*i8", S="*fp32", BIAS="*bf16", C="*bf16", N=128256, K=4096, stride_xm=4096,
            stride_wn=4096, stride_cm=128256)
for m in (1, 3, 8, 2048):
    for cfg in iw.candidates(m):
        cfg = dict(cfg)
        warps, stages, gemv = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("GEMV")
        for per_channel in (False, True):
            flags = dict(cfg, PER_CHANNEL=per_channel, HAS_BIAS=True)
            kernel = iw._gemv_kernel if gemv else iw._gemm_kernel
            sass.compile_sm90(kernel, dict(args, M=m), flags if gemv else dict(flags, IEEE=False), warps, stages)
"""


@needs_ptxas
def test_every_candidate_compiles_for_the_h100():
    """Each GEMV and GEMM candidate, per-tensor and per-row scales, compiles for sm_90."""
    out = compile_in_child(INT8_MATMUL)
    assert out.returncode == 0, out.stderr[-3000:]


# --- GPU: realistic shapes, the ops' routing ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 128256, 4096), (8, 128256, 4096), (16, 4096, 14336), (2048, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_llm_head_shapes_on_the_gpu(m, n, k, dtype):
    from bitcompile.kernels.int8_weight_matmul import int8_weight_matmul

    x, codes, scale, b = operands(m, n, k, dtype, True, False, seed=m, device="cuda")
    assert_within_summation_order(int8_weight_matmul(x, codes, scale, b), x, codes, scale, b)


@pytest.mark.gpu
def test_ops_route_float_activations_and_int8_weights_to_the_kernel(monkeypatch):
    """``weight_only_linear``, weight-only ``lowbit_linear`` and ``lowbit_matmul`` on a float ``x`` and
    int8 weights launch the kernel (counted) and match the reference."""
    from bitcompile.kernels import int8_weight_matmul as mod

    calls = []
    kernel = mod.int8_weight_matmul
    monkeypatch.setattr(mod, "int8_weight_matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    x, codes, scale, b = operands(4, 300, 512, torch.bfloat16, True, True, seed=1, device="cuda")
    ops = torch.ops.bitnet
    assert_within_summation_order(ops.weight_only_linear(x, codes, scale, b, 512), x, codes, scale, b)
    out = ops.lowbit_linear(x, x.new_empty(300, 512), b, None, None, codes, scale)
    assert_within_summation_order(out, x, codes, scale, b)
    acc = ops.lowbit_matmul(x, codes, 512)
    assert acc.dtype == torch.float32
    assert_within_summation_order((acc * scale + b.float()).to(x.dtype), x, codes, scale, b)
    assert len(calls) == 3
