"""The activation-quantization kernel (``bitcompile/kernels/act_quant.py``: absmax quantization, optionally
after a fused residual add and RMS/layer norm) against the plain-torch reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.codegen import compile_in_child, needs_ptxas
from tests.kernels.support import DTYPES, dims, near_half

ops = torch.ops.bitnet


@given(
    m=st.integers(1, 6),
    k=dims,
    kind=st.sampled_from(["none", "rms", "rms_fp32", "layer"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    residual=st.booleans(),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 2**16),
)
def test_norm_quant(kernels, device, m, k, kind, dtype, residual, bits, seed):
    # bfloat16 is covered on the GPU only: the interpreter's fp32->bf16 cast truncates.
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(m, k, generator=g)).to(dtype)
    r = torch.randn(m, k, generator=g).to(dtype) if residual else None
    w = torch.randn(k, generator=g).to(dtype) if kind != "none" else None
    b = torch.randn(k, generator=g).to(dtype) if kind == "layer" else None
    rq, rs, ry, rh = ref.norm_quant(x, r, w, b, kind, 1e-6, bits, dtype)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    q, s, y, h = kernels.act_quant.norm_quant(dev(x), bits, kind, dev(w), dev(b), 1e-6, dev(r), dtype, True, residual)
    q, s = q.cpu(), s.cpu()
    if residual:
        assert torch.equal(h.cpu(), rh)
    if kind == "none":  # max and one division: exact
        assert torch.equal(q, rq) and torch.equal(s, rs)
        return
    # Norm statistics are fp32 sums in another order (and sqrt vs rsqrt): y differs by
    # a few ulps, so the scale agrees to ~1e-6 and an integer can differ by one only where
    # the reference value sits on a rounding boundary.
    torch.testing.assert_close(y.cpu().float(), ry.float(), rtol=4e-3 if dtype == torch.float16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(s, rs, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=0)
    diff = q.int() != rq.int()
    assert (q.int() - rq.int()).abs().max() <= 1
    assert near_half(ry.float() / rs, 2e-2 if dtype == torch.float16 else 1e-3)[diff].all()


def test_act_quant_nan_and_zero_rows(kernels, device):
    x = torch.randn(3, 10)
    x[0, 4] = float("nan")
    x[1] = 0
    q, s, _, _ = kernels.act_quant.norm_quant(x.to(device))
    rq, rs = ref.quantize_activations(x)
    assert torch.equal(q.cpu(), rq)
    torch.testing.assert_close(s.cpu(), rs, equal_nan=True, rtol=0, atol=0)


def test_norm_quant_triton_twin(kernels, device):
    from bitcompile.ops import norm_quant

    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g), torch.rand(40, generator=g) + 0.5
    want = ref.norm_quant(x, r, w, None, "rms", 1e-6, 8, torch.float32)
    args = (x.to(device), r.to(device), w.to(device), None, "rms", 1e-6, 8, torch.float32, False, True)
    q, s, y, h = norm_quant.traced(norm_quant.norm_quant.Args(*args))
    assert torch.equal(q.cpu(), want[0]) and torch.equal(h.cpu(), want[3]) and y.numel() == 0
    torch.testing.assert_close(s.cpu(), want[1], rtol=1e-6, atol=0)


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).

GATED = """
import sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import act_quant as aq
args = dict(X="*bf16", RES="*bf16", W="*bf16", B="*bf16", Q="*i8", S="*fp32", Y="*bf16", H="*bf16", K=14336,
            stride_x=28672, stride_r=28672, stride_q=14336, stride_y=1, stride_h=1, eps=1e-6, qmax=127.0)
flags = dict(QEPS=1e-5, BLOCK=16384, NORM=0, HAS_RES=False, HAS_W=False, HAS_B=False, STORE_Y=False,
             STORE_H=False, USE_ASM=True, GATED=True)
sass.compile_sm90(aq._norm_quant_kernel, args, flags, aq.gated_num_warps(16384), 3)
"""


@needs_ptxas
def test_gated_prologue_compiles_for_the_h100():
    """The SwiGLU prologue at Llama-3-8B's intermediate width compiles for sm_90."""
    out = compile_in_child(GATED)
    assert out.returncode == 0, out.stderr[-3000:]


# GPU only (make test-gpu): realistic shapes, compiled kernels.


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "rms_fp32", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_quant_on_cuda(kind, dtype):
    m, k = 513, 4096
    x, r = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(m, k, device="cuda", dtype=dtype)
    w, b = torch.rand(k, device="cuda", dtype=dtype) + 0.5, torch.randn(k, device="cuda", dtype=dtype)
    bias = b if kind == "layer" else None
    q, s, y, h = ops.norm_quant(x, r, w, bias, kind, 1e-6, 8, dtype, True, True)
    rq, rs, ry, rh = ref.norm_quant(x, r, w, bias, kind, 1e-6, 8, dtype)
    assert torch.equal(h, rh)
    # The norm statistics are fp32 sums in another order, so y may differ from the reference
    # by one rounding of its dtype (then, rarely, a row's amax and so its scale moves by that).
    # "rms" rounds twice (to the dtype before the weight multiply, and after): one ulp off in
    # the first can become two in y (seen once on the H100 in fp16: 2 ulps at 2.94).
    tol = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}[dtype] * (2 if kind == "rms" else 1)
    torch.testing.assert_close(y.float(), ry.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(s, rs, rtol=tol, atol=0)
    # The quantization of the kernel's own y is exact: same integers, same scales.
    kq, ks = ref.quantize_activations(y, 8)
    assert torch.equal(q, kq) and torch.equal(s, ks)
    assert (q.int() - rq.int()).abs().max() <= 1


@pytest.mark.gpu
def test_qat_fused_norm_gradients_on_cuda():
    # Training graphs fuse the norm into norm_quant (CUDA kernel forward, plain-torch norm
    # backward): gradients equal the unfused graph's (Inductor's norm) within bf16 rounding
    # plus the occasional int8 code flip (see tests/passes/test_fusion.py).
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", torch.bfloat16)
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def grads(**options):
        torch._dynamo.reset()
        model.zero_grad()
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        torch.compile(model, backend="bitnet", options=options)(xs, rs).pow(2).mean().backward()
        return [xs.grad, rs.grad] + [p.grad.clone() for p in model.parameters()]

    for got, want in zip(grads(), grads(fuse=False)):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def assert_gated_close(q, s, x, bits):
    """Against ``reference.gated_quantize``: the kernel's exp (Triton's, or numpy's in the interpreter) may
    differ from torch's by an ulp, which can move ``silu`` and the product ``silu(gate) * up`` by an ulp or
    two of x's dtype: a code by at most 1 where it does, the scale (the largest product over qmax) by at
    most 4 ulps."""
    want_q, want_s = ref.gated_quantize(x.cpu(), bits)
    torch.testing.assert_close(s.cpu(), want_s, rtol=4 * torch.finfo(x.dtype).eps, atol=0)
    assert (q.cpu().int() - want_q.int()).abs().max() <= 1
    assert (q.cpu() != want_q).sum() <= max(1, want_q.numel() // 100)  # such flips are rare


@given(
    m=st.integers(1, 6),
    k=dims,
    dtype=st.sampled_from([torch.float32, torch.float16]),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 2**16),
)
def test_gated_quant(kernels, device, m, k, dtype, bits, seed):
    """``[gate | up]`` rows of 2k: the codes and scale of ``silu(gate) * up``, the product never written."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(m, 2 * k, generator=g)).to(dtype)
    q, s, normed, h = kernels.act_quant.norm_quant(x.to(device), bits, gated=True)
    assert q.shape == (m, k) and s.shape == (m, 1) and normed is None and h is None
    assert_gated_close(q, s, x, bits)


def test_gated_quant_op_and_its_limits(kernels, device):
    x = torch.randn(2, 3, 40)
    q, s = ops.gated_quant(x.to(device), 8)  # leading dimensions kept, each row's halves
    assert q.shape == (2, 3, 20) and s.shape == (2, 3, 1)
    assert_gated_close(q, s, x, 8)
    with pytest.raises(ValueError, match="even width"):
        kernels.act_quant.norm_quant(torch.randn(2, 7, device=device), 8, gated=True)
    with pytest.raises(ValueError, match="plain quantization only"):
        kernels.act_quant.norm_quant(torch.randn(2, 8, device=device), 8, "rms", gated=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_quant_llama_mlp_rows_on_the_gpu(m, dtype):
    """Llama-3-8B's fused gate+up output (2 x 14336 per row), through the op and its Inductor twin."""
    from bitcompile.kernels.act_quant import norm_quant

    x = (3 * torch.randn(m, 2 * 14336, device="cuda")).to(dtype)
    q, s, _, _ = norm_quant(x, 8, gated=True)
    assert_gated_close(q, s, x, 8)
    assert all(torch.equal(a, b) for a, b in zip(ops.gated_quant(x, 8), (q, s)))
