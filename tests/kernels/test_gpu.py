"""The bitnet ops on CUDA (Triton kernels) against the reference, at realistic shapes.
Run on a GPU machine: ``make test-gpu``."""
import pytest
import torch

from bitcompile.numerics import reference as ref

pytestmark = pytest.mark.gpu
ops = torch.ops.bitnet
SHAPES = [(1, 4096, 4096), (7, 1000, 1003), (16, 4096, 14336), (256, 14336, 4096), (4097, 1024, 4096)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STATIC_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_lowbit_matmul_exact(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m)
    wq, _ = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    assert torch.equal(ops.lowbit_matmul(a, wq, k), ref.lowbit_matmul(a, wq, k))


@pytest.mark.parametrize("m,n,k", [(1, 4096, 8192), (3, 1000, 1003), (16, 4096, 4096), (100, 1000, 1003),
                                   (300, 2048, 4096), (257, 512, 1040), (5, 1000, 2112), (33, 384, 4096)])
def test_every_matmul_config_exact(m, n, k, monkeypatch):
    """Every launch configuration tuning may pick (GEMV, GEMM with and without split-K, operand
    swap, one dot per block, activations by TMA from a host descriptor and, as traced launches
    make them, from one built on the device), not only the one this GPU's tuning picks; whole
    and partial 256-trit blocks (the unmasked and masked load paths; TMA's zero fill past M and
    K at 257 x 1040)."""
    from bitcompile.kernels import ternary_matmul as tm
    from bitcompile.kernels import tuning, wgmma_matmul

    g = torch.Generator(device="cuda").manual_seed(m + k)
    wq, _ = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    want = ref.lowbit_matmul(a, wq, k)
    for cfg in tm._candidates(m):
        if cfg["kernel"] == "wgmma" and not wgmma_matmul.supports(m, k, a):
            continue  # the dispatcher never picks it here (rows TMA cannot describe)
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        assert torch.equal(tm.ternary_matmul(a, wq, k), want), cfg
        if cfg.get("A_TMA"):
            assert torch.equal(tm.ternary_matmul(a, wq, k, wrap=lambda f: f), want), cfg


@pytest.mark.parametrize("m", [2, 16, 40])
def test_wgmma_matmul_epilogue(m, monkeypatch):
    """The Gluon kernel's shared epilogue (per-channel scale, bias, activation, residual, bf16)
    in every configuration, split-K included: a partial weight-row tile (N = 1000) and a
    partial last step (K = 2112 is 8.25 blocks of 256 trits)."""
    from bitcompile.kernels import ternary_matmul as tm
    from bitcompile.kernels import tuning, wgmma_matmul

    n, k = 1000, 2112
    g = torch.Generator(device="cuda").manual_seed(m)
    xq, xs = ref.quantize_activations(torch.randn(m, k, device="cuda", generator=g))
    wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g), "ternary", True)
    b, r = torch.randn(n, device="cuda", generator=g), torch.randn(m, n, device="cuda", generator=g).bfloat16()
    want = ref.linear_epilogue(xq, xs, wq, ws, b, k, torch.float32, "silu", r)
    configs = [cfg for cfg in tm._candidates(m) if cfg["kernel"] == "wgmma"]
    assert configs and wgmma_matmul.supports(m, k, xq)
    for cfg in configs:
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        got = tm.ternary_matmul(xq, wq, k, xs, ws, b, torch.bfloat16, "silu", r)
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-2, msg=str(cfg))  # as test_linear_q_epilogue


def test_compiled_matmul_builds_tma_descriptors_on_device(monkeypatch):
    """Under Inductor (traced launch) a TMA configuration describes the activations in the
    kernel, with scratch memory from the allocator Inductor sets: same output as eager."""
    from torch._inductor.utils import run_and_get_code

    from bitcompile.kernels import layout, tuning
    from bitcompile.kernels.ternary_matmul import ternary_matmul
    from bitcompile.ops.epilogue import twin_linear_q

    m, n, k = 520, 384, 1040  # a partial row tile and a partial 256-trit block
    g = torch.Generator(device="cuda").manual_seed(5)
    wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    xs = torch.rand(m, 1, device="cuda", generator=g) / 127
    blocked = layout.relayout(wq, k)
    cfg = dict(kernel="gemm", BN=128, BM=256, GROUP_N=8, SPLIT_K=1, SWAP=True, JOIN_K=True, num_warps=8,
               num_stages=3, A_TMA=True)
    monkeypatch.setattr(tuning, "choose", lambda *args: cfg)
    described = []
    real = tuning.use_scratch_allocator
    monkeypatch.setattr(tuning, "use_scratch_allocator", lambda: described.append(1) or real())

    twin_linear_q()

    def linear(a, xs, blocked, ws):
        return ops.linear_q_triton(a, xs, blocked, ws, None, k, torch.float32, "none", None)

    got, (code,) = run_and_get_code(torch.compile(linear, fullgraph=True), a, xs, blocked, ws)
    assert "_gemm_kernel" in code and "make_tensor_descriptor" in code and described
    want = ref.lowbit_matmul(a, wq, k).float() * xs * ws
    assert torch.equal(got, ternary_matmul(a, blocked, k, xs, ws, None, torch.float32, layout="kblocked"))  # host
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # fp32 dequantization order


def test_tuner_timing_excludes_host_latency():
    """The tuner ranks configurations by GPU time: 200 us of host work before a ~5 us launch
    must not be counted (Triton's do_bench counts it when it outlasts its L2 flush)."""
    import time

    from bitcompile.kernels import tuning

    x = torch.zeros(1 << 20, device="cuda")

    def slow_launch():
        time.sleep(2e-4)
        x.add_(1)

    assert tuning.gpu_microseconds(slow_launch) < 100


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowbit_linear_forward(m, n, k, dtype):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    xq, xs = ops.quantize_activations(x, 8)
    rq, rs = ref.quantize_activations(x, 8)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)  # max + one division: exact
    wq, ws = ops.quantize_weights(w, "ternary", False)
    rwq, rws = ref.quantize_weights(w, "ternary", False)
    torch.testing.assert_close(ws, rws, rtol=1e-6, atol=0)  # fp32 sums in another order
    differ = ref.unpack_weights(wq, k) != ref.unpack_weights(rwq, k)
    assert (((w.float() / rws).abs() - 0.5).abs()[differ] < 1e-4).all()  # only at |w/s| = 0.5
    # Same int32 accumulator and fp32 epilogue order as the reference: identical without
    # bias; with bias the compiler may contract `y * s_x + b` into one FMA (one rounding
    # fewer), so allow one ulp of the output dtype.
    assert torch.equal(ops.lowbit_linear(x, w, None, xq, xs, wq, ws), ref.lowbit_linear(x, None, xq, xs, wq, ws, k))
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}[dtype]
    torch.testing.assert_close(ops.lowbit_linear(x, w, b, xq, xs, wq, ws), ref.lowbit_linear(x, b, xq, xs, wq, ws, k),
                               rtol=ulp, atol=ulp)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu", "relu2"])
@pytest.mark.parametrize("m", [1, 300])
def test_linear_q_epilogue(act, m):
    n, k = 2048, 4096
    xq, xs = ref.quantize_activations(torch.randn(m, k, device="cuda"))
    wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda"), "ternary", True)
    b, r = torch.randn(n, device="cuda"), torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    got = ops.linear_q(xq, xs, wq, ws, b, k, torch.bfloat16, act, r)
    want = ref.linear_epilogue(xq, xs, wq, ws, b, k, torch.float32, act, r)
    # One bf16 rounding of the output (rel 2^-8); the fp32 activation differs by ulps.
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("kind", ["rms", "rms_fp32", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_quant(kind, dtype):
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


@pytest.mark.parametrize("m", [2, 3, 4, 16])
def test_small_m_paths_exact(m):
    # M <= 4: dp4a GEMV; 16: tensor cores. K not a multiple of the 256-trit block.
    n, k = 3000, 4100
    g = torch.Generator(device="cuda").manual_seed(m)
    wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g), "ternary", True)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    a[:, :7] = -128
    assert torch.equal(ops.lowbit_matmul(a, wq, k), ref.lowbit_matmul(a, wq, k))
    xs = torch.rand(m, 1, device="cuda") + 0.1
    got = ops.linear_q(a, xs, wq, ws, None, k, torch.float32, "none", None)
    assert torch.equal(got, ref.linear_epilogue(a, xs, wq, ws, None, k, torch.float32))


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1003), (300, 14336)])
def test_layouts_gpu(n, k):
    """The relayout kernels against the reference layouts (the matmul's "nibbles" rows, and
    the transposed operands of both input-gradient kernels)."""
    from bitcompile.kernels import layout
    from bitcompile.numerics.packing import pack_ternary, to_kblocked, unpack_ternary

    wq, _ = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(n)))
    assert torch.equal(layout.relayout(wq, k).cpu(), to_kblocked(wq.cpu(), k))
    wt = pack_ternary(unpack_ternary(wq.cpu(), k).t())
    for order in ("nibbles", "fields"):
        assert torch.equal(layout.transposed_kblocked(wq, k, order=order).cpu(), to_kblocked(wt, n, order)), order


def test_weight_pack_kblocked_gpu():
    from bitcompile.kernels.weight_pack import quantize_pack
    from bitcompile.numerics.packing import to_kblocked

    # Half-integers: every partial sum (< 2^24 halves) is exact, so the scale is too.
    w = (torch.randint(-3, 4, (512, 4100), device="cuda") / 2).to(torch.bfloat16)
    for per_channel in (False, True):
        packed, scale = quantize_pack(w, "ternary", per_channel, layout="kblocked")
        rp, rs = ref.quantize_weights(w.cpu(), "ternary", per_channel)
        assert torch.equal(scale.cpu(), rs)
        assert torch.equal(packed.cpu(), to_kblocked(rp, 4100))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("n", [2048, 2000])  # whole and partial grad_input tiles along N
def test_qat_backward(dtype, per_channel, n):
    m, k = 1024, 4096
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=dtype, requires_grad=True)
    xq, xs = ops.quantize_activations(x, 8)
    wq, ws = ops.quantize_weights(w, "ternary", per_channel)
    y = ops.lowbit_linear(x, w, None, xq, xs, wq, ws)
    g = torch.randn_like(y)
    y.backward(g)
    want_gx = (g.float() @ ref.dequantized_weight(wq, ws, k, dtype).float())
    want_gw = g.float().t() @ ref.dequantized_activations(xq, xs, dtype).float()
    rel = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-5}[dtype]
    for got, want in ((x.grad, want_gx), (w.grad, want_gw)):
        scale = want.abs().max()
        assert ((got.float() - want).abs().max() / scale) < rel * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# whole and partial tiles, N blocks; (333, 2000, 1021): tails of every axis that the Gluon kernel takes
@pytest.mark.parametrize("m,n,k", [(512, 2048, 1024), (333, 2000, 1003), (333, 2000, 1021)])
def test_every_grad_input_config(dtype, m, n, k):
    """Every grad_input launch configuration (canonical, transposed and, on the H100, Gluon
    kernels), not only the tuned one; same operands as the reference, fp32 sums in another order
    (bound as in the CPU test: n * eps_fp32 * sum|g * w| plus the final rounding to the grad
    dtype). The Gluon kernel sums the same products in the same 16-wide chunks as the
    transposed one: equal to it."""
    from bitcompile.kernels import grad_input as gi, grad_input_ws

    g = torch.Generator(device="cuda").manual_seed(n)
    wq, ws = ops.quantize_weights(torch.randn(n, k, device="cuda", generator=g), "ternary", False)
    grad = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    w = ref.dequantized_weight(wq.cpu(), ws.cpu(), k, dtype).float().cuda()
    want = grad.float() @ w
    bound = (grad.float().abs() @ w.abs()) * n * 2**-23 + want.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    ws_ok = grad_input_ws.supports(grad, wq, ws)
    assert ws_ok == (k != 1003 and grad_input_ws.available() and torch.cuda.get_device_capability() == (9, 0))
    outs = {}
    for cfg in gi._configs(transposed_ok=True, ws_ok=ws_ok):
        got = gi.grad_input(grad, wq, ws, k, config=cfg)
        outs.setdefault(cfg.get("layout", "canonical"), got)
        assert got.dtype == dtype and ((got.float() - want).abs() <= bound).all(), cfg
        if cfg.get("layout") == "ws":
            assert torch.equal(got, outs["transposed"]), cfg


@pytest.fixture
def gluon_grad_input(monkeypatch):
    """The exact-STE input gradient through the Gluon kernel only (the H100's choice at QAT sizes)."""
    from bitcompile.kernels import grad_input as gi, grad_input_ws

    if not grad_input_ws.supports(torch.empty(1, 8, device="cuda", dtype=torch.bfloat16),
                                  torch.empty(8, 16, device="cuda", dtype=torch.uint8), torch.ones(1)):
        pytest.skip("the Gluon input gradient needs an sm_90 GPU and a Triton with Gluon")
    monkeypatch.setattr(gi, "_configs", lambda transposed_ok=True, ws_ok=False: [
        dict(layout="ws", **grad_input_ws.CONFIGS[0])] if ws_ok else [])


@pytest.mark.parametrize("launch", [{"mode": "reduce-overhead"}, {"cpp_wrapper": True}], ids=["graphs", "cpp_wrapper"])
@pytest.mark.parametrize("grad_input_bits", [None, 8, "gluon"])
def test_qat_launch_modes_give_the_same_gradients(grad_input_bits, launch, request):
    """Training steps replayed as CUDA graphs (`mode="reduce-overhead"`; recording fails if the
    matmul keeps a K-blocked weight copy allocated in the graph's pool) or
    launched by Inductor's C++ wrapper give the gradients of the plain compiled layer."""
    if grad_input_bits == "gluon":  # the exact STE through the Gluon kernel's opaque op
        request.getfixturevalue("gluon_grad_input")
        grad_input_bits = None
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    grads = []
    for options in ({}, launch):
        options = {**options, "grad_input_bits": grad_input_bits} if grad_input_bits else options
        model = torch.compile(layer, backend="bitnet", options=options)
        for _ in range(3):  # warm-up, recording, replay
            xi = x.clone().requires_grad_(True)
            layer.weight.grad = None
            model(xi).backward(g)
        grads.append((xi.grad.clone(), layer.weight.grad.clone()))
    for name, plain, other in zip(("dx", "dw"), *grads):
        assert torch.equal(plain, other), (name, (plain.float() - other.float()).abs().max(), other.isfinite().all())


def test_inference_under_cpp_wrapper():
    """Decode (M=1, the GEMV) and prefill (the GEMM) with the fused norm + quantization and
    epilogues, launched by Inductor's C++ wrapper: the Python wrapper's outputs exactly."""
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", torch.bfloat16).eval()
    outs = []
    for options in ({}, {"cpp_wrapper": True}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bitnet", dynamic=False, options=options)  # both shapes lowered
        with torch.no_grad():
            outs.append([compiled(*(torch.randn(1, t, 256, device="cuda", dtype=torch.bfloat16,
                                                generator=torch.Generator("cuda").manual_seed(t + i)) for i in range(2)))
                         for t in (1, 300)])
    for t, plain, cpp in zip((1, 300), *outs):
        assert torch.equal(plain, cpp), (t, (plain.float() - cpp.float()).abs().max(), plain.isfinite().all(),
                                         cpp.isfinite().all())


def test_device_descriptors_under_cpp_wrapper(monkeypatch):
    """A GEMM whose configuration fetches the activations by TMA, compiled with Inductor's C++
    wrapper: traced, that launch would build its descriptors on the device, in a global scratch
    that torch 2.11's C++ wrapper sizes for one program, not the grid (the other programs'
    descriptors overwrite unrelated memory; wrong outputs that change from call to call). It
    loads by pointers there instead: the Python wrapper's outputs exactly, call after call."""
    from torch._inductor.utils import run_and_get_cpp_code

    from bitcompile.kernels import ternary_matmul as tm
    from bitcompile.kernels import tuning

    cfg = next(c for c in tm._gemm_configs(1024) if c.get("A_TMA"))
    monkeypatch.setattr(tuning, "choose",
                        lambda kernel, key, candidates, run: cfg if kernel.startswith("ternary_mm") else candidates[0])
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(4, 300, 1024, device="cuda", dtype=torch.bfloat16)  # 1200 rows: a grid of many programs
    outs = []
    for options in ({}, {"cpp_wrapper": True}):
        torch._dynamo.reset()
        model = torch.compile(layer, backend="bitnet", options=options)
        with torch.no_grad():
            first, code = run_and_get_cpp_code(model, x) if options else (model(x), "")
            outs.append([first.clone()] + [model(x).clone() for _ in range(3)])
    assert "'A_TMA': True" not in code  # the launch the C++ wrapper makes loads by pointers
    for plain, cpp in zip(*outs):
        assert torch.equal(plain, cpp), ((plain.float() - cpp.float()).abs().max(), cpp.isfinite().all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("m,n,k", [(1024, 2048, 4096), (333, 2000, 1003)])
def test_quantized_grad_input_equals_reference(dtype, per_channel, m, n, k):
    """grad_input_bits=8: same integers (act-quant kernel, exact int32 matmul on the transposed
    packing), same fp32 epilogue as the reference on the CPU: equal."""
    g = torch.Generator(device="cuda").manual_seed(n)
    wq, ws = ops.quantize_weights(torch.randn(n, k, device="cuda", generator=g), "ternary", per_channel)
    grad = (torch.randn(m, n, device="cuda", generator=g) * 1e-6).to(dtype)
    got = ops.grad_input(grad, wq, ws, k, 8)
    want = ref.grad_input_quantized(grad.cpu(), wq.cpu(), ws.cpu(), k, 8)
    assert got.dtype == dtype and torch.equal(got.cpu(), want)


def test_bitlinear_compiled_inference():
    from bitcompile.nn import BitLinear

    layer = BitLinear(4096, 4096, bias=True, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        plain = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
        plain.load_state_dict(layer.state_dict())
        assert torch.equal(torch.compile(plain, backend="bitnet")(x), want)


def test_triton_twins_opcheck():
    # Their fake implementation traces the kernels through wrap_triton (not possible in
    # the CPU interpreter, so this check runs here). Static shapes only: the lowering pass
    # emits them only for graphs with static shapes (the kernel variant depends on M).
    from bitcompile.kernels.layout import relayout
    from bitcompile.ops import epilogue, linear, norm_quant, quantize

    for register in (epilogue.twin_linear_q, norm_quant.twin_norm_quant, quantize.twin_quantize_weights,
                     linear.twin_lowbit_linear, linear.twin_grad_input):
        register()

    wq, ws = ops.quantize_weights(torch.randn(64, 300, device="cuda"), "ternary", False)
    xq, xs = ops.quantize_activations(torch.randn(3, 300, device="cuda"), 8)
    torch.library.opcheck(ops.linear_q_triton.default, (xq, xs, relayout(wq, 300), ws, None, 300, torch.bfloat16, "relu", None),
                          test_utils=STATIC_OPCHECK)
    x = torch.randn(3, 300, device="cuda")
    torch.library.opcheck(ops.norm_quant_triton.default, (x, None, None, None, "rms", 1e-6, 8, torch.float32, True, False),
                          test_utils=STATIC_OPCHECK)
    # the QAT twins, with inputs that need gradients (their autograd registration is checked)
    w = torch.randn(64, 300, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.quantize_weights_triton.default, (w, "ternary", False), test_utils=STATIC_OPCHECK)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(ops.lowbit_linear_triton.default, (xg, w, None, xq, xs, wq, ws, 8), test_utils=STATIC_OPCHECK)
    g = torch.randn(3, 64, device="cuda")
    for bits in (None, 8):
        torch.library.opcheck(ops.grad_input_triton.default, (g, wq, ws, 300, bits), test_utils=STATIC_OPCHECK)
    if torch.cuda.get_device_capability() == (9, 0):  # the Gluon kernel's opaque op
        wq, ws = ops.quantize_weights(torch.randn(64, 320, device="cuda"), "ternary", False)
        torch.library.opcheck(ops.grad_input_ws.default, (g.bfloat16(), wq, ws, 320, [256, 128, 4, 3, 16]))


@pytest.mark.parametrize("grad_input_bits", [None, 8, "gluon"])
def test_compiled_qat_launches_our_kernels_from_inductor_code(grad_input_bits, monkeypatch, request):
    # QAT on CUDA with static shapes: the forward and the backward graph launch the weight
    # pack, matmul and input-gradient kernels from Inductor's code (no opaque bitnet op
    # called through Python); outputs and every gradient match the opaque ops' run. Not
    # bit for bit: the per-tensor weight scale's final sum over partials is Inductor's
    # reduction there and torch's here (one ulp, measured), which moves bf16 outputs by an
    # ulp and may flip a weight within an ulp of s/2; 1% relative error (in norm) allows
    # that, a wrong kernel or operand is off by O(1).
    from torch._inductor.utils import run_and_get_code

    from bitcompile.passes import lower_triton
    from tests.passes.fusion_models import Block

    gluon = grad_input_bits == "gluon"  # the exact STE's input gradient by the Gluon kernel: one opaque op
    if gluon:
        request.getfixturevalue("gluon_grad_input")
        grad_input_bits = None
    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", torch.bfloat16)
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    options = {} if grad_input_bits is None else {"grad_input_bits": grad_input_bits}

    def step():
        model.zero_grad()
        xs = x.clone().requires_grad_()
        out = torch.compile(model, backend="bitnet", options=options)(xs, r)
        out.float().pow(2).mean().backward()
        return [out.detach(), xs.grad] + [p.grad.clone() for p in model.parameters()]

    got, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "_pack_kernel" in code and ("_gemv_kernel" in code or "_gemm_kernel" in code)
    if gluon:
        assert "bitnet.grad_input_ws.default" in code and "_grad_input" not in code
    elif grad_input_bits is None:  # the exact STE kernels
        assert "_grad_input_kernel" in code or "_grad_input_t_kernel" in code
    else:  # int8 output gradients through the forward matmul on transposed trits
        assert "_transposed_kernel" in code and "_grad_input" not in code
    assert "bitnet.lowbit_linear.default" not in code and "bitnet.quantize_weights.default" not in code
    assert "bitnet.grad_input.default" not in code
    torch._dynamo.reset()
    monkeypatch.setattr(lower_triton, "lower_to_triton", lambda gm, ctx: None)
    for a, b in zip(got, step()):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_block_launches_our_kernels_from_inductor_code(dtype, monkeypatch):
    # CUDA inference with static shapes: Inductor's generated code launches the Triton
    # kernels itself (triton_op); the output equals the same graph on the opaque ops.
    from torch._inductor.utils import run_and_get_code

    from bitcompile.passes import lower_triton
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", dtype).eval()
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(torch.compile(model, backend="bitnet"), x, r)
        assert "_norm_quant_kernel" in code and ("_gemv_kernel" in code or "_gemm_kernel" in code)
        assert "torch.ops.bitnet.linear_q.default" not in code and "bitnet.norm_quant.default" not in code
        torch._dynamo.reset()
        monkeypatch.setattr(lower_triton, "lower_to_triton", lambda gm, ctx: None)
        opaque = torch.compile(model, backend="bitnet")(x, r)
    assert torch.equal(got, opaque)


CONVS = [  # (N, C_in, C_out, HW, kernel, stride, padding, dilation, groups): ResNet / MobileNet-like
    (8, 64, 64, 56, 3, 1, 1, 1, 1), (4, 128, 256, 28, 3, 2, 1, 1, 1), (4, 256, 512, 14, 1, 1, 0, 1, 1),
    (2, 96, 96, 30, 3, 1, 2, 2, 1), (2, 64, 64, 20, 3, 1, 1, 1, 64), (2, 64, 128, 20, 3, 1, 1, 1, 4),
]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n,cin,cout,hw,kern,stride,pad,dil,groups", CONVS)
def test_conv_implicit_gemm_exact(n, cin, cout, hw, kern, stride, pad, dil, groups, layout):
    from bitcompile.kernels.conv import ternary_conv

    wshape = (cout, cin // groups, kern, kern)
    wq, _ = ref.quantize_weights(torch.randn(wshape).flatten(1))
    xq = torch.randint(-128, 128, (n, cin, hw, hw), dtype=torch.int8)
    conv = dict(stride=[stride] * 2, padding=[pad] * 2, dilation=[dil] * 2, groups=groups)
    got = ternary_conv(xq.cuda().contiguous(memory_format=layout), wq.cuda(), wshape, **conv, memory_format=layout)
    assert got.is_contiguous(memory_format=layout)
    assert torch.equal(got.cpu(), ref.lowbit_conv_accumulate(xq, wq, wshape, **conv))


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


def test_reduce_overhead_reads_repacked_weights():
    # mode="reduce-overhead": CUDA graphs treat the hoisted packed weights as static inputs
    # (not copied per replay). After a weight update the cache re-packs into a new buffer:
    # the graph must see it (re-recorded), never replay stale weights.
    from bitcompile.nn import reference_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU(), torch.nn.Linear(512, 256))
    model = model.to("cuda", torch.bfloat16).eval()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="bitnet", mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            got = compiled(x).clone()
        torch.testing.assert_close(got, reference_model(model)(x), rtol=2e-2, atol=2e-2)
        model[0].weight.mul_(-0.5)
        for _ in range(3):
            got = compiled(x).clone()
        torch.testing.assert_close(got, reference_model(model)(x), rtol=2e-2, atol=2e-2)


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
