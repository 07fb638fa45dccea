"""The implicit-GEMM packed-ternary convolution (``bitcompile/kernels/conv.py``) with its epilogue, against the
plain-torch reference."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.codegen import H100_SMEM_PER_BLOCK, compile_in_child, needs_ptxas
from tests.kernels.support import DTYPES, gpu_configs

ops = torch.ops.bitnet


@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 6),
    cout=st.integers(1, 20),
    size=st.integers(1, 9),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    spatial=st.sampled_from([1, 2]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_implicit_gemm_exact(
    kernels, device, n, cin, cout, size, kernel, stride, padding, dilation, groups, spatial, channels_last, seed
):
    from hypothesis import assume

    assume(size + 2 * padding >= dilation * (kernel - 1) + 1)
    cin, cout = cin * groups, cout * groups
    g = torch.Generator().manual_seed(seed)
    wshape = (cout, cin // groups, *([kernel] * spatial))
    wq, ws = ref.quantize_weights(torch.randn(wshape, generator=g).flatten(1))
    xq = torch.randint(-128, 128, (n, cin, *([size] * spatial)), dtype=torch.int8, generator=g)
    layout = torch.channels_last if channels_last and spatial == 2 else torch.contiguous_format
    conv = dict(stride=[stride] * spatial, padding=[padding] * spatial, dilation=[dilation] * spatial, groups=groups)
    want = ref.lowbit_conv_accumulate(xq, wq, wshape, **conv)
    got = kernels.conv.ternary_conv(
        xq.to(device).contiguous(memory_format=layout), wq.to(device), wshape, **conv, memory_format=layout
    )
    assert got.dtype == torch.int32 and got.is_contiguous(memory_format=layout) and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_epilogue(kernels, device, per_channel):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 7, generator=g)
    w, bias = torch.randn(10, 3, 3, 3, generator=g), torch.randn(10, generator=g)
    wq, ws = ref.quantize_weights(w.flatten(1), "ternary", per_channel)
    xq, xs = ref.quantize_activations_per_sample(x)
    args = ([2, 1], [1, 0], [1, 2], 2)
    want = ref.lowbit_conv(x, w.shape, bias, xq, xs, wq, ws, *args)
    got = kernels.conv.ternary_conv(
        xq.to(device), wq.to(device), w.shape, *args, xs.to(device), ws.to(device), bias.to(device), torch.float32
    )
    assert torch.equal(got.cpu(), want)  # same int32 accumulator, same fp32 operation order
    last = kernels.conv.ternary_conv(
        xq.to(device).contiguous(memory_format=torch.channels_last),
        wq.to(device),
        w.shape,
        *args,
        xs.to(device),
        ws.to(device),
        bias.to(device),
        torch.float32,
        torch.channels_last,
    )
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last.cpu(), want)


@pytest.mark.parametrize("cin_g", [3, 70])
def test_every_gpu_conv_config_exact(kernels, device, monkeypatch, cin_g):
    """The implicit-GEMM conv with each GPU tile: strided, padded, dilated, grouped, a partial
    tile of output pixels and channels, a tap's channels in one partial byte (3) or over
    several channel blocks ending in a partial one (70)."""
    cv = kernels.conv
    configs = gpu_configs(cv._configs)
    assert len(configs) >= 5
    g = torch.Generator().manual_seed(4)
    wshape = (20, cin_g, 3, 3)
    wq, _ = ref.quantize_weights(torch.randn(wshape, generator=g).flatten(1))
    xq = torch.randint(-128, 128, (2, 2 * cin_g, 11, 9), dtype=torch.int8, generator=g)
    conv = dict(stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=2)
    want = ref.lowbit_conv_accumulate(xq, wq, wshape, **conv)
    for cfg in configs:
        monkeypatch.setattr(cv.tuning, "choose", lambda *args, cfg=cfg: cfg)
        assert torch.equal(cv.ternary_conv(xq.to(device), wq.to(device), wshape, **conv).cpu(), want), cfg


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).


# Compiled in a fresh process (this one imports the kernels for the interpreter).
CONV_TILES = """
import json, sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import conv
args = dict(X="*i8", P="*u8", C="*bf16", XS="*fp32", WS="*fp32", BIAS="*bf16", ROWS=100352, CIN=64, H=56, W=56,
            OH=56, OW=56, CIN_G=64, COUT_G=64, PB=144, TAPB=16, CSTEPS=1, s_on=200704, s_oc=1, s_oh=3584, s_ow=64,
            stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
for cfg in conv._configs():
    c = dict(cfg)
    warps = c.pop("num_warps")
    flags = dict(KH=3, KW=3, EPILOGUE=True, PER_CHANNEL=False, HAS_BIAS=False, USE_ASM=True, **c)
    print(json.dumps(dict(config=cfg, **sass.profile(conv._conv_kernel, args, flags, warps, 1))))
"""


@needs_ptxas
def test_conv_tiles_compile_for_the_h100():
    """Every conv tile the tuner may pick fits the H100 without spills and fetches its
    channels-last activation tiles by ``cp.async`` (16-byte runs)."""
    out = compile_in_child(CONV_TILES)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) >= 5
    for r in rows:
        assert not r["spill_bytes"] and r["smem_bytes"] <= H100_SMEM_PER_BLOCK, r
    assert all(r["cp_async"] > 0 for r in rows if r["loop_instructions"]), rows


# GPU only (make test-gpu): realistic shapes, compiled kernels.


CONVS = [  # (N, C_in, C_out, HW, kernel, stride, padding, dilation, groups): ResNet / MobileNet-like
    (8, 64, 64, 56, 3, 1, 1, 1, 1),
    (4, 128, 256, 28, 3, 2, 1, 1, 1),
    (4, 256, 512, 14, 1, 1, 0, 1, 1),
    (2, 96, 96, 30, 3, 1, 2, 2, 1),
    (2, 64, 64, 20, 3, 1, 1, 1, 64),
    (2, 64, 128, 20, 3, 1, 1, 1, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n,cin,cout,hw,kern,stride,pad,dil,groups", CONVS)
def test_conv_implicit_gemm_exact_on_cuda(n, cin, cout, hw, kern, stride, pad, dil, groups, layout):
    from bitcompile.kernels.conv import ternary_conv

    wshape = (cout, cin // groups, kern, kern)
    wq, _ = ref.quantize_weights(torch.randn(wshape).flatten(1))
    xq = torch.randint(-128, 128, (n, cin, hw, hw), dtype=torch.int8)
    conv = dict(stride=[stride] * 2, padding=[pad] * 2, dilation=[dil] * 2, groups=groups)
    got = ternary_conv(xq.cuda().contiguous(memory_format=layout), wq.cuda(), wshape, **conv, memory_format=layout)
    assert got.is_contiguous(memory_format=layout)
    assert torch.equal(got.cpu(), ref.lowbit_conv_accumulate(xq, wq, wshape, **conv))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowbit_conv_op_on_cuda(dtype):
    # The op's CUDA kernel (implicit GEMM) against the reference op on the same quantized operands.
    x = torch.randn(4, 32, 17, 17, device="cuda", dtype=dtype)
    w, b = torch.randn(48, 32, 3, 3, device="cuda", dtype=dtype), torch.randn(48, device="cuda", dtype=dtype)
    xq, xs = ops.quantize_activations_per_sample(x, 8)
    wq, ws = ops.quantize_weights(w.flatten(1), "ternary", True)
    args = ([2, 2], [1, 1], [1, 1], 1)
    got = ops.lowbit_conv(x, w, b, xq, xs, wq, ws, *args)
    want = ref.lowbit_conv(x, w.shape, b, xq, xs, wq, ws, *args)
    # Same int32 accumulator and fp32 epilogue order, but the GPU compiler may contract
    # `y * s_x + bias` into one FMA (one rounding fewer): one ulp of fp32, which the final
    # cast can turn into one ulp of the output dtype.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_resnet_compiled_on_cuda_matches_cpu_reference(layout):
    # Conv (implicit GEMM) + BN folded into its epilogue, compiled on CUDA, against the
    # eager reference twin on the CPU (plain-torch ops); channels-last models stay so.
    import copy

    from bitcompile.nn import reference_model
    from tests.models.test_models import rel_err
    from tests.models.zoo import resnet

    torch.manual_seed(0)
    model, make, _ = resnet()
    model.eval()
    x = make(4, 16)["x"]
    with torch.no_grad():
        want = reference_model(copy.deepcopy(model))(x)
        model = model.cuda().to(memory_format=layout)
        got = torch.compile(model, backend="bitnet")(x.cuda().contiguous(memory_format=layout))
    # CPU and GPU float ops may differ by an ulp before a quantizer, which can move one int8
    # code by 1 (1/127 of that sample's scale): 1e-2 relative bounds a few such flips.
    assert rel_err(got.cpu(), want) < 1e-2
