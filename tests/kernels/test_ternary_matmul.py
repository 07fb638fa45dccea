"""The packed-ternary matmul (``bitcompile/kernels/ternary_matmul.py``: the GEMV, the GEMM and, on the H100,
the Gluon wgmma kernel of ``wgmma_matmul.py``) with its epilogue, and the Triton twins of the ops that
launch it from Inductor's code, against the plain-torch reference."""

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.kernels.common import (
    KBLOCK_PTX,
    KBLOCK_PTX_Q0,
    KBLOCK_PTX_Q1,
    KBLOCK_PTX_Q2,
    KBLOCK_PTX_Q3,
    KBLOCK_PTX_T0,
    KBLOCK_PTX_T1,
    KBLOCK_PTX_T2,
    KBLOCK_PTX_T3,
    KBLOCK_PTX_W0,
    KBLOCK_PTX_W1,
    KBLOCK_PTX_W2,
    KBLOCK_PTX_W3,
    PAIR_TABLE_WORDS,
    PAIR_TABLES,
)
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary, to_kblocked
from tests.kernels.codegen import compile_in_child, needs_ptxas, row
from tests.kernels.ptx import MASK, run_ptx
from tests.kernels.support import DTYPES, dims, gpu_configs

ops = torch.ops.bitnet


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
        xq.to(device),
        wq.to(device),
        k,
        xs.to(device),
        ws.to(device),
        bias.to(device),
        torch.float32,
        act,
        res.to(device),
    )
    assert got.shape == (2, m, n)
    if act == "none":  # same accumulator, same fp32 operation order: bit-identical
        assert torch.equal(got.cpu(), want)
    else:  # erf/exp are library functions: a few fp32 ulps
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_bad_input(kernels, device):
    wq, _ = ref.quantize_weights(torch.randn(8, 16))
    with pytest.raises(TypeError, match="int8 activations"):
        kernels.ternary_matmul.ternary_matmul(torch.randn(2, 16, device=device), wq.to(device), 16)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.ternary_matmul.ternary_matmul(
            torch.zeros(2, 16, dtype=torch.int8, device=device), wq.to(device), 16, activation="tanh"
        )


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


@pytest.mark.parametrize("rows_per_thread,ahead", [(1, 1), (2, 1), (4, 1), (1, 2), (4, 2)])
def test_gemv_rows_per_thread_exact(kernels, device, rows_per_thread, ahead, monkeypatch):
    """The GEMV with R rows per thread (in-thread axes joined from one load per row): rows
    past N (23 is not a multiple of the 8-row tile), whole and partial steps (K = 1024 and
    1300), one token and several, with the epilogue's per-channel scales; weights requested one
    step ahead, or two (the PDL launches' form)."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    cfg = dict(kernel="gemv", BN=8, BW=32, R=rows_per_thread, num_warps=4, AHEAD=ahead)
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


@pytest.mark.parametrize("launch", ["kept workspace", "traced", "graphed"])
def test_split_k_reductions_exact(kernels, device, launch, monkeypatch):
    """Both split-K reductions: stored partials summed by the last program (untraced launches:
    the shared workspace, or, with ``keep=False`` as under CUDA graphs, unzeroed partials and
    the device's preallocated counters, no fill at all) and atomics into a zeroed tile
    (launches traced by torch.compile; a pass-through ``wrap`` selects it here). Two calls in a
    row with different inputs: the arrival counters (and the atomic path's tile) must be left
    reset for the next call."""
    tm, tuning = kernels.ternary_matmul, kernels.ternary_matmul.tuning
    g = torch.Generator().manual_seed(7)
    m, n, k = 20, 40, 1030  # several 256-trit blocks per split, a partial last block
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    split = [c for c in tm._gemm_configs(m) if c["SPLIT_K"] > 1]
    assert split
    dev = torch.device(device)
    if launch == "graphed":
        monkeypatch.setattr(tm, "_graph_counters", {})  # this test's own, dropped afterwards
        tm.make_split_k_counters(dev)

    def no_fill(*args, **kwargs):
        raise AssertionError("a graphed split-K launch filled a buffer")

    for cfg in split:
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        for _ in range(2):
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g).to(device)
            with monkeypatch.context() as patch:
                if launch == "graphed":
                    patch.setattr(torch, "zeros", no_fill)
                got = tm.ternary_matmul(
                    a, wq.to(device), k, wrap=(lambda f: f) if launch == "traced" else None, keep=launch != "graphed"
                )
            assert torch.equal(got.cpu(), ref.lowbit_matmul(a.cpu(), wq, k)), cfg
    if launch == "graphed":
        assert not tm._graph_counters[dev].any()


# Interpreter only: the scratch allocator is replaced by a recorder, which a GPU launch would need.
@pytest.mark.devices("interpreter")
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


@pytest.mark.parametrize("m", [3, 7])  # interpreted: the GEMV, and the GEMM split in two along K
def test_matmul_keep_false_keeps_no_relaid_copy(kernels, device, m):
    """Training passes fresh packed weights every step: with ``keep=False`` the matmul must not
    keep their K-blocked copy (inside a CUDA graph it would be untracked pool memory); split-K
    workspaces are then fresh buffers."""
    wq, _ = ref.quantize_weights(torch.randn(8, 300))
    wq = wq.to(device)
    a = torch.randint(-128, 128, (m, 300), dtype=torch.int8).to(device)
    want = ref.lowbit_matmul(a.cpu(), wq.cpu(), 300)
    assert torch.equal(kernels.ternary_matmul.ternary_matmul(a, wq, 300, keep=False).cpu(), want)
    assert wq not in kernels.layout._cache
    assert torch.equal(kernels.ternary_matmul.ternary_matmul(a, wq, 300).cpu(), want)
    assert wq in kernels.layout._cache  # the default (inference: the same weights every call)


@pytest.mark.parametrize("m", [1, 5, 40, 300])  # GEMV; small-M GEMM (split-K); mid and large tiles
def test_every_gpu_matmul_config_exact(kernels, device, m, monkeypatch):
    """Their index and mask arithmetic at a partial row tile, a partial 256-trit block and a
    partial word (N = 40, K = 298): exact int32, and the fp32 epilogue (per-channel scale, bias,
    SiLU, residual) as the reference. TMA loads and the Gluon kernel need the GPU (the gpu tests below)."""
    tm = kernels.ternary_matmul
    configs = [c for c in gpu_configs(tm._candidates, m) if c["kernel"] in ("gemv", "gemm") and not c.get("A_TMA")]
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


@pytest.mark.parametrize("m", [1, 5, 40])
def test_swiglu_epilogue(kernels, device, m, monkeypatch):
    """``silu(gate) * up`` in the epilogue over interleaved gate/up rows: half as many output
    columns, per-row scales and bias in the interleaved order, a residual of the output's width;
    GEMV tiles of one, two and four rows per thread (a one-row tile widened to a row pair), GEMM
    tiles swapped or not, split along K or not, with partial row tiles (N = 2 x 20)."""
    tm = kernels.ternary_matmul
    configs = [c for c in gpu_configs(tm._candidates, m) if c["kernel"] in ("gemv", "gemm") and not c.get("A_TMA")]
    gemv = {c.get("R", 1): c for c in configs if c["kernel"] == "gemv"}
    gemm = {(c["SWAP"], c["SPLIT_K"] > 1): c for c in configs if c["kernel"] == "gemm"}
    chosen = [*gemv.values(), *gemm.values()] + ([dict(gemv[min(gemv)], BN=1, R=1)] if gemv else [])
    n, k = 20, 298
    g = torch.Generator().manual_seed(m)
    xq, xs = ref.quantize_activations(torch.randn(m, k, generator=g))
    gates, ups = (ref.quantize_weights(torch.randn(n, k, generator=g), "ternary", True) for _ in range(2))
    wq, ws = (ref.interleave_rows(a, b) for a, b in zip(gates, ups))
    bias, res = torch.randn(2 * n, generator=g), torch.randn(m, n, generator=g)
    want = ref.linear_epilogue(xq, xs, wq, ws, bias, k, torch.float32, "swiglu", res)
    gate = ref.linear_epilogue(xq, xs, gates[0], gates[1], bias[0::2], k, torch.float32)
    up = ref.linear_epilogue(xq, xs, ups[0], ups[1], bias[1::2], k, torch.float32)
    torch.testing.assert_close(want, torch.nn.functional.silu(gate) * up + res)  # what the interleaving means
    args = [t.to(device) for t in (xq, wq, xs, ws, bias)]
    for cfg in chosen:
        monkeypatch.setattr(tm.tuning, "choose", lambda *args, cfg=cfg: cfg)
        got = tm.ternary_matmul(*args[:2], k, *args[2:], torch.float32, "swiglu", res.to(device)).cpu()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(cfg))  # as test_matmul_epilogue


def test_swiglu_epilogue_needs_row_pairs(kernels, device):
    wq, ws = ref.quantize_weights(torch.randn(5, 64), "ternary", True)
    xq, xs = ref.quantize_activations(torch.randn(2, 64))
    with pytest.raises(ValueError, match="even number of weight rows"):
        kernels.ternary_matmul.ternary_matmul(
            xq.to(device), wq.to(device), 64, xs.to(device), ws.to(device), activation="swiglu"
        )


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
    args = epilogue.linear_q.Args(*dev, k, torch.float32, "none", res.to(device))
    assert torch.equal(epilogue.traced(args).cpu(), want)
    # the opaque call of graphs under CUDA graphs: the same kernels, launched from Python
    assert torch.equal(epilogue._kernel(args, layout="kblocked", keep=False).cpu(), want)
    # On the CPU both ops are the reference on the relaid codes.
    epilogue.twin_linear_q()
    for op in (torch.ops.bitnet.linear_q_triton, torch.ops.bitnet.linear_q_kblocked):
        assert torch.equal(op(xq, xs, blocked, ws, bias, k, torch.float32, "none", res), want)


def test_qat_triton_twins(kernels, device):
    # The QAT twins' bodies launch the same kernels as the opaque ops (through wrap_triton):
    # packed weights bit-identical and the scale to summation order (as
    # test_weight_pack.test_weight_pack_random_values); given that scale, the int8 matmul and the
    # quantized input gradient exactly the reference's, the exact input gradient within fp32 summation order.
    from bitcompile.ops import linear, quantize

    g = torch.Generator().manual_seed(0)
    x, w, grad = torch.randn(5, 70, generator=g), torch.randn(24, 70, generator=g), torch.randn(5, 24, generator=g)
    wq, ws = quantize.weights_traced(quantize.quantize_weights.Args(w.to(device), "ternary", False))
    rq, rs = ref.quantize_weights(w, "ternary", False)
    assert torch.equal(wq.cpu(), rq)
    torch.testing.assert_close(ws.cpu(), rs, rtol=1e-6, atol=0)
    rs = ws.cpu()
    xq, xs = ref.quantize_activations(x)
    out = linear.linear_traced(
        linear.lowbit_linear.Args(x.to(device), w.to(device), None, xq.to(device), xs.to(device), wq, ws)
    )
    assert torch.equal(out.cpu(), ref.lowbit_linear(x, None, xq, xs, rq, rs, 70))
    got = linear.grad_input_traced(linear.grad_input.Args(grad.to(device), wq, ws, 70, 8)).cpu()
    assert torch.equal(got, ref.grad_input_quantized(grad, rq, rs, 70, 8))
    got = linear.grad_input_traced(linear.grad_input.Args(grad.to(device), wq, ws, 70)).cpu()
    want = ref.grad_input(grad, rq, rs, 70)
    if device == "cuda":  # fp32 gradients and the scale reach the tensor cores rounded to bf16: 2^-9 each
        bound = (grad.abs() @ ref.unpack_weights(rq, 70).abs().float()) * rs * 2**-8 + 1e-6
        assert ((got - want).abs() <= bound).all()
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the quantizer of lowered linears: both layouts from one launch, the matmul on the K-blocked codes
    wq2, ws2, blocked = quantize.weights_kblocked_traced(
        quantize.quantize_weights_kblocked.Args(w.to(device), "ternary", False)
    )
    assert torch.equal(wq2.cpu(), rq) and torch.equal(ws2, ws) and torch.equal(blocked.cpu(), to_kblocked(rq, 70))
    args = (x.to(device), w.to(device), None, xq.to(device), xs.to(device), wq2, ws2, None, blocked)
    assert torch.equal(linear.linear_traced(linear.lowbit_linear.Args(*args)).cpu(), out.cpu())


# The kernel's inline PTX, run by the PTX interpreter (tests/kernels/ptx.py).


def test_kblock_ptx():
    """A "nibbles" word of 16 random trits -> each quarter's 4 trits as signed bytes, by the
    four-quarter asm and by each one-quarter asm (tables immediate, and in registers: bytes, as
    the Gluon kernel packs them, or words, as the GEMV), against ``packing.to_kblocked``."""
    rng = np.random.default_rng(0)
    for _ in range(1000):
        trits = torch.tensor(rng.integers(-1, 2, 256), dtype=torch.int16)
        words = to_kblocked(pack_ternary(trits[None]), 256)[0].view(torch.int32).tolist()
        w = int(rng.integers(0, 16))
        word = words[w] & MASK
        quarters = run_ptx(KBLOCK_PTX.value, {"$4": word})
        singles = zip(
            (KBLOCK_PTX_Q0, KBLOCK_PTX_Q1, KBLOCK_PTX_Q2, KBLOCK_PTX_Q3),
            (KBLOCK_PTX_T0, KBLOCK_PTX_T1, KBLOCK_PTX_T2, KBLOCK_PTX_T3),
            (KBLOCK_PTX_W0, KBLOCK_PTX_W1, KBLOCK_PTX_W2, KBLOCK_PTX_W3),
        )
        for g, (one, from_register, from_word_tables) in enumerate(singles):
            want = sum((int(trits[64 * g + 4 * w + n]) & 255) << 8 * n for n in range(4))
            assert quarters[f"${g}"] == want, (hex(word), g)
            assert run_ptx(one.value, {"$1": word})["$0"] == want, (hex(word), g)
            a, b = PAIR_TABLES[2 * (g & 1) : 2 * (g & 1) + 2]  # the quarter parity's table, as the kernel passes it
            assert run_ptx(from_register.value, {"$1": word, "$2": a, "$6": b})["$0"] == want, (hex(word), g)
            a, b = (t & MASK for t in PAIR_TABLE_WORDS[2 * (g & 1) : 2 * (g & 1) + 2])  # int32 kernel values
            assert run_ptx(from_word_tables.value, {"$1": word, "$2": a, "$3": b})["$0"] == want, (hex(word), g)


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).


@needs_ptxas
def test_gemv_loop_stays_in_registers(profiles):
    # Shared-memory transposes with barriers in every step were the GEMV's hidden cost
    # (8 shared-memory ops and 8 barriers per step before the full-shape operand tiles).
    stats = row(profiles, "ternary_mm:1,8192,8192")
    assert stats["smem"] == 0 and stats["bar"] == 0, stats
    cfg = stats["config"]
    words = cfg["BN"] * cfg["BW"] // (32 * cfg["num_warps"])  # weight words per thread and step
    assert stats["dp4a"] == 4 * words, stats  # one dp4a per quarter word
    # 16-byte loads: the weights, and the activations once per R rows (R = 4 is ~4% faster at
    # 8192^2 than R = 1)
    assert stats["ldg128"] == words // 4 + words // cfg.get("R", 1), stats
    # The prmt tables stay in registers (pair_tables_in_registers): with them re-materialised
    # before every prmt, this loop took 227 instructions for its 64 dp4a.
    assert stats["loop_instructions"] <= 3 * stats["dp4a"], stats


@needs_ptxas
def test_gemm_unpack_cost_and_one_tensor_core_wait_per_block(profiles):
    stats = row(profiles, "ternary_mm:8192,8192,8192", JOIN_K=True)
    cfg = stats["config"]
    trits_per_thread = cfg["BN"] * 256 // (32 * cfg["num_warps"])
    # Word-wide unpacking (4 trits per register op) and no load masks: ~2.3 instructions
    # per trit and thread per step; Triton's byte-wise int8 unpack with masks took ~8.
    assert stats["loop_instructions"] <= 3 * trits_per_thread, stats
    assert stats["mma_wait"] == 1 and stats["mma"] > 0 and stats["cp_async"] > 0, stats


@needs_ptxas
def test_wgmma_matmul_waits_once_per_step(profiles):
    """The Gluon kernel's point: one tensor-core wait per step (its MMAs then overlap the next
    step's decode), and few barriers (each TMA copy costs one)."""
    import triton

    stats = row(profiles, "ternary_mm:16,8192,8192")
    cfg = stats["config"]
    assert cfg["kernel"] == "wgmma" and stats["mma"] == 8 * cfg["NB"], stats  # 2 k32 MMAs per quarter
    if triton.__version__.startswith("3.6"):
        assert stats["mma_wait"] == 1 and stats["bar"] <= 4, stats
    else:  # seen with Triton 3.9 (no GPU here to time it): ptxas waits after every MMA
        pytest.skip(f"Triton {triton.__version__} serialises the kernel's MMAs ({stats['mma_wait']} waits per step)")


SYNC_PROFILE = """
import json, sys
sys.path.insert(0, {tools!r})
import sass
cfg = dict(kernel="mma_sync", BN=64, NB=2, STAGES=4, SPLIT_K=4, WIDE=True, num_warps=4)
print(json.dumps(sass.profile(*sass.ternary_mm_case(cfg, 8, 4096, 14336))))
"""


@needs_ptxas
def test_mma_sync_matmul_has_no_warpgroup_waits():
    """The Gluon kernel's mma.sync form (batch-8 decode at Llama-3-8B's down projection): 8 tokens
    per m16n8k32 MMA, so one MMA per k32 step and 16-row warp tile (2 per quarter), no warpgroup
    arrive/wait, no spills, and fewer instructions than the warpgroup form's 243-instruction
    step at this configuration (Triton 3.9, kernel-log round 34)."""
    out = compile_in_child(SYNC_PROFILE)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["mma"] == 8 * 2 and stats["mma_wait"] == 0 and stats["spill_bytes"] == 0, stats
    assert stats["loop_instructions"] < 243, stats


SWIGLU_STORES = """
import json, sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels.common import ACTIVATIONS
cfg = dict(A_TMA=True, BM=128, BN=128, GROUP_N=8, JOIN_K=False, SPLIT_K=1, SWAP=True, kernel="gemm",
           num_stages=2, num_warps=8)  # the shipped 2048 x 28672 x 4096 tile
stores = {}
for act in ("none", "swiglu"):
    kernel, args, constexprs, warps, stages = sass.ternary_mm_case(cfg, 2048, 28672, 4096)
    cubin = sass.compile_sm90(kernel, args, {**constexprs, "ACTIVATION": ACTIVATIONS[act]}, warps, stages).asm["cubin"]
    ops = [op for _, op, _ in sass.SASS_OP.findall(sass._run("cuobjdump", cubin, "-sass"))]
    stores[act] = [op for op in ops if op.startswith("STG")]
print(json.dumps(stores))
"""


@needs_ptxas
def test_swiglu_epilogue_stores_are_wide():
    """The swiglu epilogue writes half the tile with half the stores, all 16 bytes wide: output
    offsets derived through the row-pair split made them 2-byte scalars (32 per thread), and a
    2048-token prefill's matmuls 1.6x slower on the H100 (BENCHMARKS.md round 35)."""
    out = compile_in_child(SWIGLU_STORES)
    assert out.returncode == 0, out.stderr[-3000:]
    stores = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(op.endswith(".128") for op in stores["none"] + stores["swiglu"]), stores
    assert 2 * len(stores["swiglu"]) == len(stores["none"]), stores


PDL_ORDER = """
import json, re, sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels.act_quant import _norm_quant_kernel

def loads_before_wait(ptx):
    at = ptx.find("griddepcontrol.wait")
    return None if at < 0 else len(re.findall(r"ld\\.global", ptx[:at]))

out = {}
cfg = dict(BN=8, BW=128, R=4, kernel="gemv", num_stages=2, num_warps=2)  # the shipped 1 x 6144 x 4096 tile
forms = {"off": dict(PDL=False, AHEAD=1), "one": dict(PDL=True, AHEAD=1), "two": dict(PDL=True, AHEAD=2)}
for name, extra in forms.items():
    kernel, args, constexprs, warps, stages = sass.ternary_mm_case(cfg, 1, 6144, 4096)
    ptx = sass.compile_sm90(kernel, args, {**constexprs, **extra}, warps, stages).asm["ptx"]
    out[name] = [loads_before_wait(ptx), "griddepcontrol.launch_dependents" in ptx]
pointers = dict(X="*bf16", RES="*bf16", W="*bf16", B="*bf16", Q="*i8", S="*fp32", Y="*bf16", H="*bf16")
strides = dict.fromkeys(("stride_x", "stride_r", "stride_q", "stride_y", "stride_h"), 4096)
args = dict(pointers, **strides, K=4096, eps=1e-6, qmax=127.0)
flags = dict(QEPS=1e-5, BLOCK=4096, NORM=1, HAS_RES=False, HAS_W=True, HAS_B=False, STORE_Y=False, STORE_H=False)
ptx = sass.compile_sm90(_norm_quant_kernel, args, dict(flags, USE_ASM=True, GATED=False, PDL=True), 4, 1).asm["ptx"]
then = ptx.find("griddepcontrol.launch_dependents") > ptx.find("griddepcontrol.wait")
out["norm_quant"] = [loads_before_wait(ptx), then]
cfg = dict(kernel="mma_sync", BN=64, NB=2, STAGES=4, SPLIT_K=4, WIDE=True, num_warps=4)  # shipped at 8 x 4096 x 14336
for pdl in (False, True):
    kernel, args, constexprs, warps, stages = sass.ternary_mm_case(cfg, 8, 4096, 14336)
    ptx = sass.compile_sm90(kernel, args, {**constexprs, "PDL": pdl}, warps, stages).asm["ptx"]
    at = ptx.find("griddepcontrol.wait")
    copies = [m.start() for m in re.finditer(r"cp\\.async\\.bulk\\.tensor", ptx)]
    out[f"gluon {pdl}"] = [len(copies), None if at < 0 else sum(c < at for c in copies)]
print(json.dumps(out))
"""


@needs_ptxas
def test_pdl_launches_wait_before_reading_what_came_before():
    """Programmatic dependent launch (``BITCOMPILE_PDL=1``): the GEMV requests only weights (its
    first one or two steps) before ``griddepcontrol.wait``, then the activations; the Gluon
    matmul issues its ring's first STAGES - 1 weight copies (TMA) before the wait and their
    activation copies after, the same copies as without PDL; the quantizer waits before its first
    load and only then lets its dependents launch. Without PDL no grid-dependency instruction."""
    out = compile_in_child(PDL_ORDER)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    one = got["one"][0]
    assert got["off"] == [None, False] and got["one"] == [one, True] and one > 0, got
    assert got["two"] == [2 * one, True], got
    assert got["norm_quant"] == [0, True], got
    copies = got["gluon False"][0]
    assert got["gluon False"] == [copies, None] and got["gluon True"] == [copies, 4 - 1], got


# GPU only (make test-gpu): realistic shapes, compiled kernels.


SHAPES = [(1, 4096, 4096), (7, 1000, 1003), (16, 4096, 14336), (256, 14336, 4096), (4097, 1024, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8])  # the GEMV; the Gluon matmul
def test_pdl_chain_exact_under_cuda_graphs(rows, monkeypatch):
    """A decode layer's launch pattern, (norm + quantization -> matmul) four times, each
    matmul's output the next norm's input, with ``BITCOMPILE_PDL=1``: eager and captured in a
    CUDA graph (replayed on fresh inputs), bitwise what the launches without PDL give. A matmul
    that read its activations before the quantizer finished would read the previous replay's."""
    from bitcompile.kernels.act_quant import norm_quant
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    k = 4096
    layers = []
    for n in (4096, 4096, 4096, 6144):
        wq, ws = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g))
        layers.append((to_kblocked(wq, k), ws))
    norm_w = torch.rand(k, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    x = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16)

    def chain():
        h, outs = x, []
        for wq, ws in layers:
            q, s, _, _ = norm_quant(h, 8, "rms", norm_w, None, 1e-6)
            h = ternary_matmul(q, wq, k, s, ws, None, torch.bfloat16, layout="kblocked", keep=False)
            outs.append(h)
        return outs

    def plain(value):
        x.copy_(value)
        monkeypatch.delenv("BITCOMPILE_PDL", raising=False)
        try:
            return [t.clone() for t in chain()]
        finally:
            monkeypatch.setenv("BITCOMPILE_PDL", "1")

    inputs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(8)]
    want = [plain(v) for v in inputs]
    monkeypatch.setenv("BITCOMPILE_PDL", "1")
    x.copy_(inputs[0])
    assert all(torch.equal(a, b) for a, b in zip(chain(), want[0]))  # eager PDL launches
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for value, expected in zip(inputs, want):
        x.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, expected))


STATIC_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_lowbit_matmul_exact(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m)
    wq, _ = ref.quantize_weights(torch.randn(n, k, device="cuda", generator=g))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    assert torch.equal(ops.lowbit_matmul(a, wq, k), ref.lowbit_matmul(a, wq, k))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 4096, 8192),
        (3, 1000, 1003),
        (16, 4096, 4096),
        (100, 1000, 1003),
        (300, 2048, 4096),
        (257, 512, 1040),
        (5, 1000, 2112),
        (33, 384, 4096),
    ],
)
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
        if cfg["kernel"] in wgmma_matmul.KINDS and not wgmma_matmul.supports(m, k, a):
            continue  # the dispatcher never picks it here (rows TMA cannot describe)
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        assert torch.equal(tm.ternary_matmul(a, wq, k), want), cfg
        if cfg.get("A_TMA"):
            assert torch.equal(tm.ternary_matmul(a, wq, k, wrap=lambda f: f), want), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 8, 16, 40])
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
    configs = [cfg for cfg in tm._candidates(m) if cfg["kernel"] in wgmma_matmul.KINDS]
    assert configs and wgmma_matmul.supports(m, k, xq)
    for cfg in configs:
        monkeypatch.setattr(tuning, "choose", lambda *args, cfg=cfg: cfg)
        got = tm.ternary_matmul(xq, wq, k, xs, ws, b, torch.bfloat16, "silu", r)
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-2, msg=str(cfg))  # as test_linear_q_epilogue


@pytest.mark.gpu
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
    cfg = dict(
        kernel="gemm",
        BN=128,
        BM=256,
        GROUP_N=8,
        SPLIT_K=1,
        SWAP=True,
        JOIN_K=True,
        num_warps=8,
        num_stages=3,
        A_TMA=True,
    )
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


@pytest.mark.gpu
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
    torch.testing.assert_close(
        ops.lowbit_linear(x, w, b, xq, xs, wq, ws), ref.lowbit_linear(x, b, xq, xs, wq, ws, k), rtol=ulp, atol=ulp
    )


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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
            outs.append(
                [
                    compiled(
                        *(
                            torch.randn(
                                1,
                                t,
                                256,
                                device="cuda",
                                dtype=torch.bfloat16,
                                generator=torch.Generator("cuda").manual_seed(t + i),
                            )
                            for i in range(2)
                        )
                    )
                    for t in (1, 300)
                ]
            )
    for t, plain, cpp in zip((1, 300), *outs):
        assert torch.equal(plain, cpp), (
            t,
            (plain.float() - cpp.float()).abs().max(),
            plain.isfinite().all(),
            cpp.isfinite().all(),
        )


@pytest.mark.gpu
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
    monkeypatch.setattr(
        tuning, "choose", lambda kernel, key, candidates, run: cfg if kernel.startswith("ternary_mm") else candidates[0]
    )
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


@pytest.mark.gpu
def test_bitlinear_compiled_inference():
    from bitcompile.nn import BitLinear

    layer = BitLinear(4096, 4096, bias=True, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        plain = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
        plain.load_state_dict(layer.state_dict())
        assert torch.equal(torch.compile(plain, backend="bitnet")(x), want)


@pytest.mark.gpu
def test_triton_twins_opcheck():
    # Their fake implementation traces the kernels through wrap_triton (not possible in
    # the CPU interpreter, so this check runs here). Static shapes only: the lowering pass
    # emits them only for graphs with static shapes (the kernel variant depends on M).
    from bitcompile.kernels.layout import relayout
    from bitcompile.ops import epilogue, linear, norm_quant, quantize

    for register in (
        epilogue.twin_linear_q,
        norm_quant.twin_norm_quant,
        quantize.twin_quantize_weights,
        quantize.twin_quantize_weights_kblocked,
        linear.twin_lowbit_linear,
        linear.twin_grad_input,
    ):
        register()

    wq, ws = ops.quantize_weights(torch.randn(64, 300, device="cuda"), "ternary", False)
    xq, xs = ops.quantize_activations(torch.randn(3, 300, device="cuda"), 8)
    torch.library.opcheck(
        ops.linear_q_triton.default,
        (xq, xs, relayout(wq, 300), ws, None, 300, torch.bfloat16, "relu", None),
        test_utils=STATIC_OPCHECK,
    )
    x = torch.randn(3, 300, device="cuda")
    torch.library.opcheck(
        ops.norm_quant_triton.default,
        (x, None, None, None, "rms", 1e-6, 8, torch.float32, True, False),
        test_utils=STATIC_OPCHECK,
    )
    # the QAT twins, with inputs that need gradients (their autograd registration is checked)
    w = torch.randn(64, 300, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.quantize_weights_triton.default, (w, "ternary", False), test_utils=STATIC_OPCHECK)
    torch.library.opcheck(
        ops.quantize_weights_kblocked_triton.default, (w, "ternary", False), test_utils=STATIC_OPCHECK
    )
    xg = x.clone().requires_grad_()
    torch.library.opcheck(ops.lowbit_linear_triton.default, (xg, w, None, xq, xs, wq, ws, 8), test_utils=STATIC_OPCHECK)
    wkb = relayout(wq, 300)
    torch.library.opcheck(
        ops.lowbit_linear_triton.default, (xg, w, None, xq, xs, wq, ws, None, wkb), test_utils=STATIC_OPCHECK
    )
    g = torch.randn(3, 64, device="cuda")
    for bits in (None, 8):
        torch.library.opcheck(ops.grad_input_triton.default, (g, wq, ws, 300, bits), test_utils=STATIC_OPCHECK)
    if torch.cuda.get_device_capability() == (9, 0):  # the Gluon kernel's opaque op
        wq, ws = ops.quantize_weights(torch.randn(64, 320, device="cuda"), "ternary", False)
        torch.library.opcheck(ops.grad_input_ws.default, (g.bfloat16(), wq, ws, 320, [256, 128, 4, 3, 16]))


@pytest.mark.gpu
@pytest.mark.parametrize("deployed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_block_launches_our_kernels_from_inductor_code(dtype, deployed, monkeypatch):
    # CUDA inference with static shapes: Inductor's generated code launches the Triton
    # kernels itself (triton_op); the output equals the same graph on the opaque ops. A deployed
    # model (packed buffers) is lowered the same way.
    from torch._inductor.utils import run_and_get_code

    from bitcompile.passes import lower_triton
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=256, hidden=512).to("cuda", dtype).eval()
    if deployed:
        from bitcompile import deploy

        model = deploy(model)
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(torch.compile(model, backend="bitnet"), x, r)
        assert "_norm_quant_kernel" in code and ("_gemv_kernel" in code or "_gemm_kernel" in code)
        assert "torch.ops.bitnet.linear_q.default" not in code and "bitnet.norm_quant.default" not in code
        torch._dynamo.reset()
        monkeypatch.setattr(lower_triton, "lower_to_triton", lambda gm, ctx: None)
        opaque = torch.compile(model, backend="bitnet")(x, r)
    assert torch.equal(got, opaque)


@pytest.mark.gpu
def test_cuda_graphs_launch_any_matmul_kernel_for_a_few_tokens(monkeypatch):
    # Under CUDA graphs, 14 rows: the linears are opaque calls (free at replay) that launch the
    # tuned kernel, Gluon included; replayed, they equal the same graph on the opaque ops.
    from torch._inductor.utils import run_and_get_code

    from bitcompile import deploy
    from bitcompile.passes import lower_triton
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = deploy(Block(d=256, hidden=512).to("cuda", torch.bfloat16).eval())
    x, r = (torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        compiled = torch.compile(model, backend="bitnet", mode="reduce-overhead")
        _, (code, *_) = run_and_get_code(compiled, x, r)
        assert "bitnet.linear_q_kblocked.default" in code and "_norm_quant_kernel" not in code
        for _ in range(3):  # recording, then replays
            got = compiled(x, r).clone()
        torch._dynamo.reset()
        monkeypatch.setattr(lower_triton, "lower_to_triton", lambda gm, ctx: None)
        opaque = torch.compile(model, backend="bitnet")(x, r)
    assert torch.equal(got, opaque)


@pytest.mark.gpu
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
