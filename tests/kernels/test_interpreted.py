"""Every Triton kernel against the plain-torch reference at small shapes (interpreter on
the CPU). Shapes include non-multiples of the block sizes (16/32/64) and of 4."""
import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref

dims = st.integers(1, 70)


def near_half(v: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Where ``v`` lies within ``tol`` of a rounding boundary (x.5)."""
    return ((v - v.floor()) - 0.5).abs() < tol


@given(m=st.integers(1, 20), n=dims, k=dims, seed=st.integers(0, 2**16))
def test_matmul_int32_exact(kernels, device, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    got = kernels.ternary_matmul.ternary_matmul(a.to(device), wq.to(device), k)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref.lowbit_matmul(a, wq, k))


def test_matmul_candidates_built_once_and_never_modified(kernels, device):
    """Launches share one candidate list per (M, launch kind) (host time): a launch
    that modified a configuration would change every later launch's choice."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    key = (3, False, tuning.interpreting())  # k = 70 is not whole TMA chunks: never the Gluon kernel
    shared = tm._launch_candidates(*key)
    before = copy.deepcopy(shared)
    wq, ws = ref.quantize_weights(torch.randn(5, 70))
    xq, xs = ref.quantize_activations(torch.randn(3, 70))
    for _ in range(2):
        tm.ternary_matmul(xq.to(device), wq.to(device), 70, xs.to(device), ws.to(device), out_dtype=torch.float32)
    assert tm._launch_candidates(*key) is shared
    assert shared == before


@pytest.mark.parametrize("m", [1, 3, 9, 33])  # GEMV (M = 1) and GEMM paths
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh", "silu", "relu2"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matmul_epilogue(kernels, device, m, act, per_channel):
    g = torch.Generator().manual_seed(m)
    n, k = 37, 70
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    xq, xs = ref.quantize_activations(torch.randn(2, m, k, generator=g))
    bias, res = torch.randn(n, generator=g), torch.randn(2, m, n, generator=g)
    want = ref.linear_epilogue(xq, xs, wq, ws, bias, k, torch.float32, act, res)
    got = kernels.ternary_matmul.ternary_matmul(
        xq.to(device), wq.to(device), k, xs.to(device), ws.to(device), bias.to(device), torch.float32, act, res.to(device))
    assert got.shape == (2, m, n)
    if act == "none":  # same accumulator, same fp32 operation order: bit-identical
        assert torch.equal(got.cpu(), want)
    else:  # erf/exp are library functions: a few fp32 ulps
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@given(m=st.integers(1, 6), k=dims, kind=st.sampled_from(["none", "rms", "rms_fp32", "layer"]),
       dtype=st.sampled_from([torch.float32, torch.float16]), residual=st.booleans(), bits=st.sampled_from([8, 4]),
       seed=st.integers(0, 2**16))
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


@given(n=dims, k=dims, per_channel=st.booleans(), scheme=st.sampled_from(["ternary", "binary"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_weight_pack_exact(kernels, device, n, k, per_channel, scheme, dtype, seed):
    # Weights on a dyadic grid: every partial sum is exact, so the absmean scale is
    # independent of the reduction order and packing must match bit for bit.
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(-24, 25, (n, k), generator=g) / 8).to(dtype)
    packed, scale = kernels.weight_pack.quantize_pack(w.to(device), scheme, per_channel)
    rp, rs = ref.quantize_weights(w, scheme, per_channel)
    assert torch.equal(scale.cpu(), rs)
    assert torch.equal(packed.cpu(), rp)


def test_weight_pack_random_values(kernels, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(45, 67, generator=g)
    packed, scale = kernels.weight_pack.quantize_pack(w.to(device))
    rp, rs = ref.quantize_weights(w)
    torch.testing.assert_close(scale.cpu(), rs, rtol=1e-6, atol=0)
    diff = ref.unpack_weights(packed.cpu(), 67) != ref.unpack_weights(rp, 67)
    assert near_half(w / rs, 1e-4)[diff].all()  # a trit may differ only at |w/s| = 0.5


@given(per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_pack_trits_at_rounding_boundaries(kernels, device, per_channel, seed):
    """Weights within a few ulps of s/2 (the trit boundary fl(w / s) = 0.5, a tie) for scales
    with random mantissas: the kernel decides trits by comparisons, the reference divides and
    rounds; with the kernel's own scale the trits must be equal."""
    g = torch.Generator().manual_seed(seed)
    n, k = 6, 128
    # the scale each row's (or the tensor's) mean |w| lands near, a few ulps off
    target = torch.rand(n if per_channel else 1, 1, generator=g).expand(n, 1) + 0.5
    ulps = torch.randint(-4, 5, (n, k // 2), generator=g).float()
    near = target * 0.5 * (1 + ulps * 2**-24)  # a few ulps around s/2
    sign = torch.where(torch.rand(n, k // 2, generator=g) < 0.5, -1.0, 1.0)
    w = torch.cat([sign * near, 1.5 * target.expand(n, k // 2)], dim=1)  # mean |w| ~ target
    packed, scale = kernels.weight_pack.quantize_pack(w.to(device), "ternary", per_channel)
    want = ref.weight_integers(w, scale.cpu(), "ternary")
    assert torch.equal(ref.unpack_weights(packed.cpu(), k), want)


def test_weight_pack_rejects_unsupported(kernels, device):
    with pytest.raises(ValueError, match="supports ternary, binary"):
        kernels.weight_pack.quantize_pack(torch.randn(4, 4, device=device), "int8")


@given(m=st.integers(1, 20), n=dims, k=dims, per_channel=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16), variant=st.integers(0, 99))
@example(m=3, n=32, k=70, per_channel=True, dtype=torch.float16, seed=1, variant=0)  # whole N tiles: unmasked grad loads
@example(m=17, n=48, k=64, per_channel=False, dtype=torch.float32, seed=2, variant=0)
@example(m=5, n=256, k=40, per_channel=False, dtype=torch.float16, seed=3, variant=1)  # transposed, whole N blocks
@example(m=18, n=300, k=33, per_channel=False, dtype=torch.float16, seed=4, variant=2)  # transposed, joined, 2 blocks
def test_grad_input(kernels, device, m, n, k, per_channel, dtype, seed, variant):
    g = torch.Generator().manual_seed(seed)
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    grad = torch.randn(m, n, generator=g).to(dtype)
    # every kernel that takes these operands: canonical; transposed per shift and joined (16-bit, one scale)
    configs = kernels.grad_input._configs(transposed_ok=not per_channel and dtype != torch.float32)
    got = kernels.grad_input.grad_input(grad.to(device), wq.to(device), ws.to(device), k,
                                        config=configs[variant % len(configs)]).cpu()
    # Same operands as the reference (trit * s_w in grad dtype); fp32 accumulation in
    # another order: error <= n * eps_fp32 * sum|g*w| plus the final rounding to dtype.
    want = grad.float() @ ref.dequantized_weight(wq, ws, k, dtype).float()
    bound = (grad.float().abs() @ ref.dequantized_weight(wq, ws, k, dtype).float().abs()) * n * 2**-23
    bound = bound + want.abs() * (2**-10 if dtype == torch.float16 else 0) + 1e-30
    assert got.dtype == dtype
    assert ((got.float() - want).abs() <= bound).all()


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
        gi.grad_input(grad.to(device), wq.to(device), ws.to(device), 128, config=dict(layout="ws", **grad_input_ws.CONFIGS[0]))


@pytest.mark.parametrize("order", ["nibbles", "fields"])
@given(n=st.integers(1, 600), k=dims, seed=st.integers(0, 2**16))
@example(n=256, k=64, seed=0)  # whole blocks, whole row tiles
def test_transposed_kblocked(kernels, device, order, n, k, seed):
    from bitcompile.numerics.packing import pack_ternary, to_kblocked, unpack_ternary

    g = torch.Generator().manual_seed(seed)
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    got = kernels.layout.transposed_kblocked(wq.to(device), k, order=order).cpu()
    assert torch.equal(got, to_kblocked(pack_ternary(unpack_ternary(wq, k).t()), n, order))


@given(m=st.integers(1, 24), n=dims, k=dims, per_channel=st.booleans(), bits=st.sampled_from([8, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
@example(m=20, n=300, k=33, per_channel=True, bits=8, dtype=torch.float16, seed=3)  # > 1 block of N, GEMM path
def test_grad_input_quantized(kernels, device, m, n, k, per_channel, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    # Gradients far below the activations' 1e-5 clamp (bf16 on the GPU only: see test_norm_quant)
    grad = (torch.randn(m, n, generator=g) * (1e-8 if dtype == torch.float32 else 1e-4)).to(dtype)
    grad[0, : n // 2] = 0  # a partly zero row
    got = kernels.grad_input.grad_input_quantized(grad.to(device), wq.to(device), ws.to(device), k, bits).cpu()
    # Same integers (exact quantization, exact int32 sums), same fp32 epilogue: equal.
    want = ref.grad_input_quantized(grad, wq, ws, k, bits)
    assert got.dtype == dtype and torch.equal(got, want)


def test_matmul_rejects_bad_input(kernels, device):
    wq, _ = ref.quantize_weights(torch.randn(8, 16))
    with pytest.raises(TypeError, match="int8 activations"):
        kernels.ternary_matmul.ternary_matmul(torch.randn(2, 16, device=device), wq.to(device), 16)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.ternary_matmul.ternary_matmul(torch.zeros(2, 16, dtype=torch.int8, device=device), wq.to(device), 16,
                                              activation="tanh")


# GEMV (dp4a emulated) and the four interpreter GEMM variants (index m % 4: split-K, operand
# order, one dot per quarter or per block)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 20, 21, 22, 23])
# whole and partial blocks and words; 1300 and 2100: 3 and 5 GEMV steps, EVEN and not
@pytest.mark.parametrize("k", [255, 300, 512, 516, 777, 1024, 1300, 2100])
def test_matmul_multi_block_exact(kernels, device, m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    n = 23
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    a[0, :5] = -128  # the most negative int8 (sign extension of each byte)
    got = kernels.ternary_matmul.ternary_matmul(a.to(device), wq.to(device), k)
    assert torch.equal(got.cpu(), ref.lowbit_matmul(a, wq, k))
    # The K-blocked layout given directly, as a weight cache would.
    blocked = kernels.layout.relayout(wq.to(device), k)
    got = kernels.ternary_matmul.ternary_matmul(a.to(device), blocked, k, layout="kblocked")
    assert torch.equal(got.cpu(), ref.lowbit_matmul(a, wq, k))


@pytest.mark.parametrize("rows_per_thread", [1, 2, 4])
def test_gemv_rows_per_thread_exact(kernels, device, rows_per_thread, monkeypatch):
    """The GEMV with R rows per thread (in-thread axes joined from one load per row): rows
    past N (23 is not a multiple of the 8-row tile), whole and partial steps (K = 1024 and
    1300), one token and several, with the epilogue's per-channel scales."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    cfg = dict(kernel="gemv", BN=8, BW=32, R=rows_per_thread, num_warps=4)
    monkeypatch.setattr(tuning, "choose", lambda *args: cfg)
    g = torch.Generator().manual_seed(rows_per_thread)
    for m, k in [(1, 1024), (1, 1300), (3, 1300)]:
        wq, ws = ref.quantize_weights(torch.randn(23, k, generator=g), "ternary", True)
        xq, xs = ref.quantize_activations(torch.randn(m, k, generator=g))
        xq[0, :5] = -128
        got = tm.ternary_matmul(xq.to(device), wq.to(device), k)
        assert torch.equal(got.cpu(), ref.lowbit_matmul(xq, wq, k)), (m, k)
        got = tm.ternary_matmul(xq.to(device), wq.to(device), k, xs.to(device), ws.to(device), out_dtype=torch.float32)
        want = ref.linear_epilogue(xq, xs, wq, ws, None, k, torch.float32, "none", None)
        assert torch.equal(got.cpu(), want), (m, k)


@pytest.mark.parametrize("traced", [False, True])
def test_split_k_reductions_exact(kernels, device, traced, monkeypatch):
    """Both split-K reductions: stored partials summed by the last program (untraced launches,
    shared workspace) and atomics into a zeroed tile (launches traced by torch.compile; a
    pass-through ``wrap`` selects it here). Two calls in a row with different inputs: the
    arrival counters (and the atomic path's tile) must be left reset for the next call."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    g = torch.Generator().manual_seed(7)
    m, n, k = 20, 40, 1030  # several 256-trit blocks per split, a partial last block
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    split = [c for c in tm._gemm_configs(m) if c["SPLIT_K"] > 1]
    assert split
    for cfg in split:
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        for _ in range(2):
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
            got = tm.ternary_matmul(a.to(device), wq.to(device), k, wrap=(lambda f: f) if traced else None)
            assert torch.equal(got.cpu(), ref.lowbit_matmul(a, wq, k)), cfg


@pytest.mark.parametrize("join_k", [False, True])
def test_matmul_activations_by_tma_exact(kernels, device, join_k, monkeypatch):
    """The TMA activation loads (``A_TMA``): rows past M and trits past K (a partial 256-trit
    block) come back as TMA's zero fill, from a host descriptor (eager) or one built in the
    kernel (a traced launch, pass-through ``wrap``, which sets up Triton's scratch allocator)."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    g = torch.Generator().manual_seed(11)
    m, n, k = 40, 24, 272
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    cfg = dict(kernel="gemm", BN=16, BM=16, GROUP_N=4, SPLIT_K=1, SWAP=True, JOIN_K=join_k, num_warps=4, A_TMA=True)
    monkeypatch.setattr(tuning, "choose", lambda *args: cfg)
    allocations = []
    monkeypatch.setattr(tuning, "use_scratch_allocator", lambda: allocations.append(1))
    for wrap, device_descriptors in ((None, 0), (lambda f: f, 1)):
        got = tm.ternary_matmul(a.to(device), wq.to(device), k, wrap=wrap)
        assert torch.equal(got.cpu(), ref.lowbit_matmul(a, wq, k))
        assert len(allocations) == device_descriptors


@given(n=dims, k=st.integers(1, 600), seed=st.integers(0, 2**16))
def test_relayout_matches_reference(kernels, device, n, k, seed):
    from bitcompile.numerics.packing import from_kblocked, to_kblocked

    g = torch.Generator().manual_seed(seed)
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    got = kernels.layout.relayout(wq.to(device), k).cpu()
    assert torch.equal(got, to_kblocked(wq, k))
    assert torch.equal(from_kblocked(got, k), wq)
    if k % 4:  # the last byte's padding fields hold no trits: whatever bits they carry are ignored
        noisy = wq.clone()
        noisy[:, -1] |= torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) & (0xFF << (2 * (k % 4))) & 0xFF
        assert torch.equal(kernels.layout.relayout(noisy.to(device), k).cpu(), got)


def test_kblocked_cache_follows_changes(kernels, device):
    wq, _ = ref.quantize_weights(torch.randn(8, 300))
    wq = wq.to(device)
    first = kernels.layout.kblocked(wq, 300)
    assert kernels.layout.kblocked(wq, 300) is first  # cached
    wq.copy_(ref.quantize_weights(torch.randn(8, 300))[0].to(device))  # in-place change bumps the version
    again = kernels.layout.kblocked(wq, 300)
    assert again is not first
    from bitcompile.numerics.packing import to_kblocked
    assert torch.equal(again.cpu(), to_kblocked(wq.cpu(), 300))


def test_matmul_keep_false_keeps_no_relaid_copy(kernels, device):
    """Training passes fresh packed weights every step: with ``keep=False`` the matmul must not
    keep their K-blocked copy (inside a CUDA graph it would be untracked pool memory)."""
    wq, _ = ref.quantize_weights(torch.randn(8, 300))
    wq = wq.to(device)
    a = torch.randint(-128, 128, (3, 300), dtype=torch.int8).to(device)
    want = ref.lowbit_matmul(a.cpu(), wq.cpu(), 300)
    assert torch.equal(kernels.ternary_matmul.ternary_matmul(a, wq, 300, keep=False).cpu(), want)
    assert wq not in kernels.layout._cache
    assert torch.equal(kernels.ternary_matmul.ternary_matmul(a, wq, 300).cpu(), want)
    assert wq in kernels.layout._cache  # the default (inference: the same weights every call)


@given(n=dims, k=st.integers(1, 600), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_pack_kblocked_layout(kernels, device, n, k, per_channel, seed):
    from bitcompile.numerics.packing import to_kblocked

    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-24, 25, (n, k), generator=g) / 8
    packed, scale = kernels.weight_pack.quantize_pack(w.to(device), "ternary", per_channel, layout="kblocked")
    rp, rs = ref.quantize_weights(w, "ternary", per_channel)
    assert torch.equal(scale.cpu(), rs)
    assert torch.equal(packed.cpu(), to_kblocked(rp, k))


@given(m=st.integers(1, 20), n=dims, k=dims, per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_q_triton_twin(kernels, device, m, n, k, per_channel, seed):
    # The Inductor-visible twin runs the same kernels on K-blocked weights: bit-identical
    # to the reference without an activation (same int32 accumulator, same fp32 order).
    from bitcompile.numerics.packing import to_kblocked
    from bitcompile.ops import epilogue

    g = torch.Generator().manual_seed(seed)
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", per_channel)
    xq, xs = ref.quantize_activations(torch.randn(m, k, generator=g))
    bias, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    want = ref.linear_epilogue(xq, xs, wq, ws, bias, k, torch.float32, "none", res)
    blocked = to_kblocked(wq, k)
    dev = [t.to(device) for t in (xq, xs, blocked, ws, bias)]
    got = epilogue.traced(epilogue.linear_q.Args(*dev, k, torch.float32, "none", res.to(device)))
    assert torch.equal(got.cpu(), want)
    # On the CPU the op itself is the reference on the relaid codes.
    epilogue.twin_linear_q()
    cpu = torch.ops.bitnet.linear_q_triton(xq, xs, blocked, ws, bias, k, torch.float32, "none", res)
    assert torch.equal(cpu, want)


def test_norm_quant_triton_twin(kernels, device):
    from bitcompile.ops import norm_quant

    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g), torch.rand(40, generator=g) + 0.5
    want = ref.norm_quant(x, r, w, None, "rms", 1e-6, 8, torch.float32)
    args = (x.to(device), r.to(device), w.to(device), None, "rms", 1e-6, 8, torch.float32, False, True)
    q, s, y, h = norm_quant.traced(norm_quant.norm_quant.Args(*args))
    assert torch.equal(q.cpu(), want[0]) and torch.equal(h.cpu(), want[3]) and y.numel() == 0
    torch.testing.assert_close(s.cpu(), want[1], rtol=1e-6, atol=0)



def test_qat_triton_twins(kernels, device):
    # The QAT twins' bodies launch the same kernels as the opaque ops (through wrap_triton):
    # packed weights bit-identical and the scale to summation order (as test_weight_pack_random_values);
    # given that scale, the int8 matmul and the quantized input gradient exactly the
    # reference's, the exact input gradient within fp32 summation order.
    from bitcompile.ops import linear, quantize

    g = torch.Generator().manual_seed(0)
    x, w, grad = torch.randn(5, 70, generator=g), torch.randn(24, 70, generator=g), torch.randn(5, 24, generator=g)
    wq, ws = quantize.weights_traced(quantize.quantize_weights.Args(w.to(device), "ternary", False))
    rq, rs = ref.quantize_weights(w, "ternary", False)
    assert torch.equal(wq.cpu(), rq)
    torch.testing.assert_close(ws.cpu(), rs, rtol=1e-6, atol=0)
    rs = ws.cpu()
    xq, xs = ref.quantize_activations(x)
    out = linear.linear_traced(linear.lowbit_linear.Args(x.to(device), w.to(device), None, xq.to(device), xs.to(device),
                                                         wq, ws))
    assert torch.equal(out.cpu(), ref.lowbit_linear(x, None, xq, xs, rq, rs, 70))
    got = linear.grad_input_traced(linear.grad_input.Args(grad.to(device), wq, ws, 70, 8)).cpu()
    assert torch.equal(got, ref.grad_input_quantized(grad, rq, rs, 70, 8))
    got = linear.grad_input_traced(linear.grad_input.Args(grad.to(device), wq, ws, 70)).cpu()
    torch.testing.assert_close(got, ref.grad_input(grad, rq, rs, 70), rtol=1e-5, atol=1e-6)


@given(n=st.integers(1, 2), cin=st.integers(1, 6), cout=st.integers(1, 20), size=st.integers(1, 9),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), spatial=st.sampled_from([1, 2]), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv_implicit_gemm_exact(kernels, device, n, cin, cout, size, kernel, stride, padding, dilation, groups,
                                  spatial, channels_last, seed):
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
    got = kernels.conv.ternary_conv(xq.to(device).contiguous(memory_format=layout), wq.to(device), wshape, **conv,
                                    memory_format=layout)
    assert got.dtype == torch.int32 and got.is_contiguous(memory_format=layout) and torch.equal(got.cpu(), want)


@given(n=st.integers(1, 3), c=st.integers(1, 40), size=st.integers(1, 40), spatial=st.sampled_from([1, 2]),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), bits=st.sampled_from([8, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_per_sample_quantization_equals_reference(kernels, device, n, c, size, spatial, layout, bits, dtype, nan, seed):
    """Both launches (sliced absmax with an atomic max on the float bits, then quantize into the
    channels-last integers) against the reference: integers and scales exactly, NaN samples
    included, from contiguous, channels-last and strided inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *([size] * spatial), generator=g) * 10 ** torch.randn(n, *([1] * spatial), generator=g)
         .unsqueeze(1)).to(dtype)
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


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_epilogue(kernels, device, per_channel):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 7, generator=g)
    w, bias = torch.randn(10, 3, 3, 3, generator=g), torch.randn(10, generator=g)
    wq, ws = ref.quantize_weights(w.flatten(1), "ternary", per_channel)
    xq, xs = ref.quantize_activations_per_sample(x)
    args = ([2, 1], [1, 0], [1, 2], 2)
    want = ref.lowbit_conv(x, w.shape, bias, xq, xs, wq, ws, *args)
    got = kernels.conv.ternary_conv(xq.to(device), wq.to(device), w.shape, *args, xs.to(device), ws.to(device),
                                    bias.to(device), torch.float32)
    assert torch.equal(got.cpu(), want)  # same int32 accumulator, same fp32 operation order
    last = kernels.conv.ternary_conv(xq.to(device).contiguous(memory_format=torch.channels_last), wq.to(device),
                                     w.shape, *args, xs.to(device), ws.to(device), bias.to(device), torch.float32,
                                     torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last.cpu(), want)


def gpu_configs(build, *args):
    """What ``build`` lists on a GPU: every launch configuration a GPU's tuner may pick (with
    the interpreter each kernel lists one or a few small tiles, and the GPU suite runs them all
    only when a GPU round does)."""
    from unittest import mock

    from bitcompile.kernels import tuning

    with mock.patch.object(tuning, "interpreting", lambda: False):
        return build(*args)


@pytest.mark.parametrize("m", [1, 5, 40, 300])  # GEMV; small-M GEMM (split-K); mid and large tiles
def test_every_gpu_matmul_config_exact(kernels, device, m, monkeypatch):
    """Their index and mask arithmetic at a partial row tile, a partial 256-trit block and a
    partial word (N = 40, K = 298): exact int32, and the fp32 epilogue (per-channel scale, bias,
    SiLU, residual) as the reference. TMA loads and the Gluon kernel need the GPU (test_gpu.py)."""
    tm = kernels.ternary_matmul
    configs = [c for c in gpu_configs(tm._candidates, m) if c["kernel"] != "wgmma" and not c.get("A_TMA")]
    assert len(configs) >= 10
    n, k = 40, 298
    g = torch.Generator().manual_seed(m)
    xq, xs = ref.quantize_activations(torch.randn(m, k, generator=g))
    xq[0, :5] = -128
    wq, ws = ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", True)
    bias, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    exact = ref.lowbit_matmul(xq, wq, k)
    fused = ref.linear_epilogue(xq, xs, wq, ws, bias, k, torch.float32, "silu", res)
    args = [t.to(device) for t in (xq, wq)], [t.to(device) for t in (xs, ws, bias)], res.to(device)
    for cfg in configs:
        monkeypatch.setattr(tm.tuning, "choose", lambda *args, cfg=cfg: cfg)
        assert torch.equal(tm.ternary_matmul(*args[0], k).cpu(), exact), cfg
        got = tm.ternary_matmul(*args[0], k, *args[1], torch.float32, "silu", args[2]).cpu()
        torch.testing.assert_close(got, fused, rtol=1e-5, atol=1e-5, msg=str(cfg))  # as test_matmul_epilogue


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


@pytest.mark.parametrize("layout", ["canonical", "kblocked"])
def test_every_gpu_weight_pack_config_exact(kernels, device, layout, monkeypatch):
    """Weight quantize + pack with each GPU launch configuration (row tiles of both passes,
    the per-tensor partial sums): rows past the tile, K past the block, both scale kinds."""
    from bitcompile.numerics.packing import to_kblocked

    wp = kernels.weight_pack
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-24, 25, (70, 300), generator=g) / 8  # dyadic: sums exact in any order
    configs = gpu_configs(wp._configs)
    assert len(configs) >= 6
    for cfg in configs:
        monkeypatch.setattr(wp.tuning, "choose", lambda *args, cfg=cfg: cfg)
        for per_channel in (False, True):
            packed, scale = wp.quantize_pack(w.to(device), "ternary", per_channel, layout=layout)
            rp, rs = ref.quantize_weights(w, "ternary", per_channel)
            assert torch.equal(scale.cpu(), rs), cfg
            assert torch.equal(packed.cpu(), rp if layout == "canonical" else to_kblocked(rp, 300)), cfg


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
