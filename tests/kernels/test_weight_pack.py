"""The weight quantize + pack kernel (``bitcompile/kernels/weight_pack.py``: absmean scale, trits packed
four to a byte, canonical or K-blocked) against the plain-torch reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.codegen import compile_in_child, needs_ptxas
from tests.kernels.support import dims, gpu_configs, near_half


@given(
    n=dims,
    k=dims,
    per_channel=st.booleans(),
    scheme=st.sampled_from(["ternary", "binary"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
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


@given(n=dims, k=st.integers(1, 600), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_pack_kblocked_layout(kernels, device, n, k, per_channel, seed):
    from bitcompile.numerics.packing import to_kblocked

    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-24, 25, (n, k), generator=g) / 8
    packed, scale = kernels.weight_pack.quantize_pack(w.to(device), "ternary", per_channel, layout="kblocked")
    rp, rs = ref.quantize_weights(w, "ternary", per_channel)
    assert torch.equal(scale.cpu(), rs)
    assert torch.equal(packed.cpu(), to_kblocked(rp, k))


@given(
    n=dims,
    k=st.integers(1, 600),
    per_channel=st.booleans(),
    scheme=st.sampled_from(["ternary", "binary"]),
    seed=st.integers(0, 2**16),
)
def test_weight_pack_both_layouts_in_one_launch(kernels, device, n, k, per_channel, scheme, seed):
    # QAT's quantizer for lowered linears: the canonical codes and their K-blocked layout, one launch.
    from bitcompile.numerics.packing import to_kblocked

    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-24, 25, (n, k), generator=g) / 8
    packed, scale, blocked = kernels.weight_pack.quantize_pack_both(w.to(device), scheme, per_channel)
    rp, rs = ref.quantize_weights(w, scheme, per_channel)
    assert torch.equal(scale.cpu(), rs)
    assert torch.equal(packed.cpu(), rp)
    assert torch.equal(blocked.cpu(), to_kblocked(rp, k))


def test_weight_pack_per_tensor_scale_sums_the_capped_partials(kernels, device, monkeypatch):
    # More row tiles than partial sums: each abs-sum program loops over several tiles, and every
    # pack program sums the partials itself (no launch of its own for the total).
    wp = kernels.weight_pack
    monkeypatch.setattr(wp, "MAX_PARTS", 4)
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-24, 25, (70, 40), generator=g) / 8  # 18 row tiles of 4 over 4 programs
    packed, scale = wp.quantize_pack(w.to(device), "ternary", False)
    rp, rs = ref.quantize_weights(w, "ternary", False)
    assert torch.equal(scale.cpu(), rs) and torch.equal(packed.cpu(), rp)


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


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py), in a fresh process.
WEIGHT_PACK = """
import sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import weight_pack as wp
for cfg in wp._configs():
    sass.compile_sm90(wp._abs_sum_kernel, dict(W="*fp32", ROWSUM="*fp32", PART="*fp32", N=4096, K=4096, stride_w=4096),
                      dict(BN=cfg["sum_rows"], BK=cfg["sum_cols"]), cfg["sum_warps"], 3)
    for layout in (0, 1, 2):
        for per_channel in (False, True):
            args = dict(W="*bf16", ROWSUM="*fp32", PART="*fp32", SCALE="*fp32", P="*u8", P2="*u8", N=4096, K=4096,
                        KB=1024, KB2=1024, n_part=200, count=2.0**24, stride_w=4096, stride_p=1024, stride_p2=1024)
            flags = dict(BN=cfg["BN"], PER_CHANNEL=per_channel, SCHEME=0, LAYOUT=layout, QB=wp.Q, PARTS=wp.MAX_PARTS)
            sass.compile_sm90(wp._pack_kernel, args, flags, cfg["num_warps"], 3)
"""


@needs_ptxas
def test_weight_pack_compiles_for_the_h100():
    """The abs-sum loop and the pack kernel in each layout (both at once included) and scale kind
    compile for sm_90 at every GPU configuration (the interpreter accepts what a compile rejects)."""
    out = compile_in_child(WEIGHT_PACK)
    assert out.returncode == 0, out.stderr[-3000:]


# GPU only (make test-gpu): realistic shapes, compiled kernels.


@pytest.mark.gpu
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
