"""The exact-STE input gradient ``grad @ (trits * s_w)`` (``bitcompile/kernels/grad_input.py``: canonical and
transposed Triton kernels, and the warp-specialised Gluon kernel of ``grad_input_ws.py`` on the H100) and
its int8 variant, in the kernels and in compiled QAT steps, against the plain-torch reference."""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitcompile.kernels.common import ONE_TABLES
from bitcompile.kernels.grad_input import SCALED_TRITS_PTX, TRIT_PAIR_PTX
from bitcompile.kernels.grad_input_ws import DECODE_PTX_TEXT
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary
from tests.kernels.codegen import needs_ptxas, row
from tests.kernels.ptx import MASK, run_ptx
from tests.kernels.support import DTYPES, dims, gpu_configs

ops = torch.ops.bitnet


@given(
    m=st.integers(1, 20),
    n=dims,
    k=dims,
    per_channel=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
    variant=st.integers(0, 99),
)
@example(m=3, n=32, k=70, per_channel=True, dtype=torch.float16, seed=1, variant=0)  # whole N tiles: unmasked loads
@example(m=17, n=48, k=64, per_channel=False, dtype=torch.float32, seed=2, variant=0)
@example(m=5, n=256, k=40, per_channel=False, dtype=torch.float16, seed=3, variant=1)  # transposed, whole N blocks
@example(m=18, n=300, k=33, per_channel=False, dtype=torch.float16, seed=4, variant=2)  # transposed, joined, 2 blocks
def test_grad_input(kernels, device, m, n, k, per_channel, dtype, seed, variant):
    g = torch.Generator().manual_seed(seed)
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    grad = torch.randn(m, n, generator=g).to(dtype)
    # every kernel that takes these operands: canonical; transposed per shift and joined (16-bit, one scale)
    configs = kernels.grad_input._configs(transposed_ok=not per_channel and dtype != torch.float32)
    got = kernels.grad_input.grad_input(
        grad.to(device), wq.to(device), ws.to(device), k, config=configs[variant % len(configs)]
    ).cpu()
    # Same operands as the reference (trit * s_w in grad dtype); fp32 accumulation in
    # another order: error <= n * eps_fp32 * sum|g*w| plus the final rounding to dtype.
    want = grad.float() @ ref.dequantized_weight(wq, ws, k, dtype).float()
    bound = (grad.float().abs() @ ref.dequantized_weight(wq, ws, k, dtype).float().abs()) * n * 2**-23
    bound = bound + want.abs() * (2**-10 if dtype == torch.float16 else 0) + 1e-30
    assert got.dtype == dtype
    assert ((got.float() - want).abs() <= bound).all()


# Interpreter only: on an sm_90 GPU the Gluon kernel runs, so there is no fallback to check.
@pytest.mark.devices("interpreter")
def test_grad_input_gluon_entry_falls_back_where_it_cannot_run(kernels, device, monkeypatch):
    """A tuning entry naming the Gluon kernel (the shipped H100 table's), met where that kernel
    cannot run (here: no sm_90 GPU), is replaced by the best Triton kernel under a key of its
    own; asked for explicitly, the Gluon kernel says what it takes."""
    from bitcompile.kernels import grad_input_ws

    gi, keys = kernels.grad_input, []

    def choose(kernel, key, candidates, run):
        keys.append(key)
        return candidates[0] if key[-1] == "triton" else dict(layout="ws", **grad_input_ws.CONFIGS[0])

    monkeypatch.setattr(gi.tuning, "choose", choose)
    g = torch.Generator().manual_seed(0)
    wq, ws = ref.quantize_weights(torch.randn(64, 128, generator=g))
    grad = torch.randn(5, 64, generator=g).to(torch.float16)
    got = gi.grad_input(grad.to(device), wq.to(device), ws.to(device), 128).cpu()
    assert keys[-1][-1] == "triton" and keys[0][-1] != "triton"
    want = grad.float() @ ref.dequantized_weight(wq, ws, 128, torch.float16).float()
    torch.testing.assert_close(got.float(), want, rtol=2**-10, atol=1e-5)
    with pytest.raises(ValueError, match="sm_90"):
        gi.grad_input(
            grad.to(device), wq.to(device), ws.to(device), 128, config=dict(layout="ws", **grad_input_ws.CONFIGS[0])
        )


@given(
    m=st.integers(1, 24),
    n=dims,
    k=dims,
    per_channel=st.booleans(),
    bits=st.sampled_from([8, 4]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
@example(m=20, n=300, k=33, per_channel=True, bits=8, dtype=torch.float16, seed=3)  # > 1 block of N, GEMM path
def test_grad_input_quantized(kernels, device, m, n, k, per_channel, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    # Gradients far below the activations' 1e-5 clamp (bf16 on the GPU only: see test_act_quant.test_norm_quant)
    grad = (torch.randn(m, n, generator=g) * (1e-8 if dtype == torch.float32 else 1e-4)).to(dtype)
    grad[0, : n // 2] = 0  # a partly zero row
    got = kernels.grad_input.grad_input_quantized(grad.to(device), wq.to(device), ws.to(device), k, bits).cpu()
    # Same integers (exact quantization, exact int32 sums), same fp32 epilogue: equal.
    want = ref.grad_input_quantized(grad, wq, ws, k, bits)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_gpu_grad_input_config(kernels, device, per_channel):
    """The input-gradient kernels' GPU tiles (canonical; transposed, one weight scale) at a
    partial token tile, N not a multiple of 4 and K a partial block, within test_grad_input's
    fp32-reordering bound. The Gluon kernel needs the GPU."""
    gi = kernels.grad_input
    configs = gpu_configs(gi._configs, not per_channel, False)
    assert len(configs) >= 6
    m, n, k = 70, 258, 300
    g = torch.Generator().manual_seed(int(per_channel))
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    grad = torch.randn(m, n, generator=g).to(torch.float16)
    dequantized = ref.dequantized_weight(wq, ws, k, torch.float16).float()
    want = grad.float() @ dequantized
    bound = (grad.float().abs() @ dequantized.abs()) * n * 2**-23 + want.abs() * 2**-10 + 1e-30
    for cfg in configs:
        got = gi.grad_input(grad.to(device), wq.to(device), ws.to(device), k, config=cfg).cpu()
        assert ((got.float() - want).abs() <= bound).all(), cfg


# The kernel's inline PTX, run by the PTX interpreter (tests/kernels/ptx.py).


def test_scaled_trits_ptx():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        trits = rng.integers(-1, 2, 4).tolist()
        scale_bits = rng.integers(1, 0x7F80, 4).tolist()  # positive finite bf16/fp16-like patterns
        packed = sum((t & 255) << 8 * i for i, t in enumerate(trits))
        regs = run_ptx(SCALED_TRITS_PTX.value, {"$2": packed, **{f"${3 + i}": b for i, b in enumerate(scale_bits)}})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        want = [0 if t == 0 else b | (0x8000 if t < 0 else 0) for t, b in zip(trits, scale_bits)]
        assert got == want, (trits, scale_bits)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_trit_pair_ptx(dtype, shift):
    """Two packed bytes -> the 16-bit float bits of their trits at ``shift`` (-1.0, 0, 1.0)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lo, hi = ONE_TABLES[dtype]
    rng = np.random.default_rng(shift)
    for _ in range(1000):
        trits = rng.integers(-1, 2, (2, 4))  # two bytes, four fields each (code 3 is never packed)
        pair = sum(int(t + 1) << (8 * byte + 2 * field) for byte in range(2) for field, t in enumerate(trits[byte]))
        out = run_ptx(TRIT_PAIR_PTX.value, {"$1": pair, "$2": shift, "$3": lo, "$4": hi})["$0"]
        want = torch.tensor(trits[:, shift // 2], dtype=torch_dtype).view(torch.int16).tolist()
        assert [out & 0xFFFF, out >> 16] == [w & 0xFFFF for w in want], (trits, shift)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_ws_decode_ptx(dtype):
    """The warp-specialised input gradient's decode: one word of canonical bytes -> register 2s
    holds field s of bytes 0 and 1, register 2s + 1 field s of bytes 2 and 3, as 16-bit -1.0 /
    0 / 1.0 (low half first)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lo, hi = ONE_TABLES[dtype]
    rng = np.random.default_rng(1)
    for _ in range(1000):
        trits = torch.tensor(rng.integers(-1, 2, (1, 16)), dtype=torch.int16)  # k = 4 byte + field
        word = int(pack_ternary(trits)[0].view(torch.int32)[0]) & MASK
        regs = run_ptx(DECODE_PTX_TEXT, {"$8": word, "$9": lo, "$13": hi})
        bits = trits[0].to(torch_dtype).view(torch.int16).tolist()
        for s in range(4):
            for half, byte in ((0, 0), (0, 1), (1, 2), (1, 3)):
                got = (regs[f"${2 * s + half}"] >> 16 * (byte % 2)) & 0xFFFF
                assert got == bits[4 * byte + s] & 0xFFFF, (hex(word), s, byte)


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).


@needs_ptxas
def test_grad_input_ws_keeps_one_mma_in_flight(profiles):
    """The warp-specialised input gradient's MMA warps: a step's 4 wgmma (out^T, BK 128 / BM 256:
    one m64n256 block per warpgroup, four k16) and one wait, for the step before, per step; the
    accumulator in the launch's 168 registers without spills."""
    stats = row(profiles, "grad_input:8192,8192,8192,torch.bfloat16")
    assert stats["config"]["layout"] == "ws", stats
    assert stats["mma"] == 4 and stats["mma_wait"] == 1 and stats["spill_bytes"] == 0, stats
    assert stats["regs"] <= 168, stats


# GPU only (make test-gpu): realistic shapes, compiled kernels.


@pytest.mark.gpu
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
    if dtype == torch.float32:  # fp32 output gradients are rounded once to bf16 for the tensor cores
        want_gx = g.bfloat16().float() @ ref.dequantized_weight(wq, ws, k, torch.bfloat16).float()
    else:
        want_gx = g.float() @ ref.dequantized_weight(wq, ws, k, dtype).float()
    want_gw = g.float().t() @ ref.dequantized_activations(xq, xs, dtype).float()
    rel = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-5}[dtype]
    for got, want in ((x.grad, want_gx), (w.grad, want_gw)):
        scale = want.abs().max()
        assert ((got.float() - want).abs().max() / scale) < rel * 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# whole and partial tiles, N blocks; (333, 2000, 1021): tails of every axis that the Gluon kernel takes
@pytest.mark.parametrize("m,n,k", [(512, 2048, 1024), (333, 2000, 1003), (333, 2000, 1021)])
def test_every_grad_input_config(dtype, m, n, k):
    """Every grad_input launch configuration (canonical, transposed and, on the H100, Gluon
    kernels), not only the tuned one; same operands as the reference, fp32 sums in another order
    (bound as in the CPU test: n * eps_fp32 * sum|g * w| plus the final rounding to the grad
    dtype). The Gluon kernel sums the same products in the same 16-wide chunks as the
    transposed one: equal to it."""
    from bitcompile.kernels import grad_input as gi
    from bitcompile.kernels import grad_input_ws

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


@pytest.mark.gpu
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


@pytest.fixture
def gluon_grad_input(monkeypatch):
    """The exact-STE input gradient through the Gluon kernel only (the H100's choice at QAT sizes)."""
    from bitcompile.kernels import grad_input as gi
    from bitcompile.kernels import grad_input_ws

    if not grad_input_ws.supports(
        torch.empty(1, 8, device="cuda", dtype=torch.bfloat16),
        torch.empty(8, 16, device="cuda", dtype=torch.uint8),
        torch.ones(1),
    ):
        pytest.skip("the Gluon input gradient needs an sm_90 GPU and a Triton with Gluon")
    monkeypatch.setattr(
        gi,
        "_configs",
        lambda transposed_ok=True, ws_ok=False: [dict(layout="ws", **grad_input_ws.CONFIGS[0])] if ws_ok else [],
    )
    monkeypatch.setattr(gi, "GLUON_TRACED_MIN_FLOPS", 0)  # compiled graphs too, at the tests' small shapes


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_compiled_small_layers_keep_the_input_gradient_in_inductors_code():
    # Below GLUON_TRACED_MIN_FLOPS the opaque Gluon op's host cost outweighs any kernel gain: a
    # compiled step launches a Triton input-gradient kernel from Inductor's code instead.
    from torch._inductor.utils import run_and_get_code

    from bitcompile.kernels import grad_input as gi
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", torch.bfloat16)
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert 2 * 14 * 512 * 256 < gi.GLUON_TRACED_MIN_FLOPS

    def step():
        out = torch.compile(model, backend="bitnet")(x.clone().requires_grad_(), r)
        out.float().pow(2).mean().backward()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "bitnet.grad_input_ws.default" not in code
    assert "_grad_input_kernel" in code or "_grad_input_t_kernel" in code


@pytest.mark.gpu
@pytest.mark.parametrize(
    "grad_input_bits,autocast", [(None, False), (8, False), ("gluon", False), (None, True), ("gluon", True)]
)
def test_compiled_qat_launches_our_kernels_from_inductor_code(grad_input_bits, autocast, monkeypatch, request):
    # QAT on CUDA with static shapes: the forward and the backward graph launch the weight
    # pack, matmul and input-gradient kernels from Inductor's code (no opaque bitnet op
    # called through Python); outputs and every gradient match the opaque ops' run. Not
    # required bit for bit: Inductor fuses the float operations around our kernels differently
    # in the two graphs, which can move a bf16 output by an ulp and so flip a weight or an
    # activation code within an ulp of its rounding boundary; 1% relative error (in norm)
    # allows that, a wrong kernel or operand is off by O(1).
    from torch._inductor.utils import run_and_get_code

    from bitcompile.passes import lower_triton
    from tests.passes.fusion_models import Block

    gluon = grad_input_bits == "gluon"  # the exact STE's input gradient by the Gluon kernel: one opaque op
    if gluon:
        request.getfixturevalue("gluon_grad_input")
        grad_input_bits = None
    elif grad_input_bits is None:  # the Triton kernels, whatever the tuning table prefers on this GPU
        from bitcompile.kernels import grad_input as gi

        triton_only = gi._configs
        monkeypatch.setattr(gi, "_configs", lambda transposed_ok=True, ws_ok=False: triton_only(transposed_ok, False))
    torch.manual_seed(0)
    # autocast: fp32 parameters under bf16 autocast (mixed precision), the norms fused through
    # the linears' input cast
    dtype = torch.float32 if autocast else torch.bfloat16
    model = Block(d=256, hidden=512).to("cuda", dtype)
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=dtype) for _ in range(2))
    options = {} if grad_input_bits is None else {"grad_input_bits": grad_input_bits}

    def step():
        model.zero_grad()
        xs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = torch.compile(model, backend="bitnet", options=options)(xs, r)
        out.float().pow(2).mean().backward()
        return [out.detach(), xs.grad] + [p.grad.clone() for p in model.parameters()]

    got, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "_pack_kernel" in code and ("_gemv_kernel" in code or "_gemm_kernel" in code)
    assert "_relayout_kernel" not in code  # the pack kernel writes the matmul's layout too
    assert "_norm_quant_kernel" in code and "bitnet.norm_quant.default" not in code
    if gluon:
        # (Inductor may name a fused kernel after the op, "..._grad_input_ws_view_0": only our
        # Triton kernels' names are checked for)
        assert "bitnet.grad_input_ws.default" in code
        assert "_grad_input_kernel" not in code and "_grad_input_t_kernel" not in code
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
