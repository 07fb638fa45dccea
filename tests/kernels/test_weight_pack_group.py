"""The grouped weight pack (``bitcompile/kernels/weight_pack_group.py``: several weights in one abs-sum and one
pack launch) against the reference and against the single-weight kernel with the same tile sizes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import to_kblocked
from tests.kernels.codegen import compile_in_child, needs_ptxas

SHAPES = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 600)), min_size=1, max_size=6)


@given(
    shapes=SHAPES,
    per_channel=st.booleans(),
    scheme=st.sampled_from(["ternary", "binary"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),  # (the interpreter has no bfloat16)
    seed=st.integers(0, 2**16),
)
def test_group_is_exact(kernels, device, shapes, per_channel, scheme, dtype, seed):
    """Weights on a dyadic grid (every partial sum exact, as in test_weight_pack_exact): each weight's
    codes in both layouts and its scale equal the reference bit for bit, empty weights included."""
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randint(-24, 25, shape, generator=g) / 8).to(dtype) for shape in shapes]
    got = kernels.weight_pack_group.quantize_pack_group([w.to(device) for w in weights], scheme, per_channel)
    assert len(got) == len(weights)
    for w, (codes, scale, blocked) in zip(weights, got):
        want_codes, want_scale = ref.quantize_weights(w, scheme, per_channel)
        assert torch.equal(codes.cpu(), want_codes) and torch.equal(scale.cpu(), want_scale)
        if w.numel():  # (the reference relayout takes no empty weight; the kernel pads with zero trits)
            assert torch.equal(blocked.cpu(), to_kblocked(want_codes, w.shape[1]))


@pytest.mark.parametrize("per_channel", [False, True])
def test_group_equals_the_single_weight_kernel_on_random_values(kernels, device, per_channel, monkeypatch):
    """Random (not dyadic) weights: with the single-weight kernel set to the group's tile sizes, the same
    sums in the same order, so the same scales and codes bit for bit."""
    group, single = kernels.weight_pack_group, kernels.weight_pack
    tiles = dict(sum_rows=group.SUM_ROWS, sum_cols=group.SUM_COLS, sum_warps=group.SUM_WARPS)
    monkeypatch.setattr(single, "_configs", lambda: [dict(**tiles, BN=group.PACK_ROWS, num_warps=group.PACK_WARPS)])
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=g).to(device) for shape in ((45, 67), (300, 40), (17, 520), (1, 3))]
    for w, got in zip(weights, group.quantize_pack_group(weights, "ternary", per_channel)):
        want = single.quantize_pack_both(w, "ternary", per_channel)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_group_rejects_what_it_cannot_take(kernels, device):
    f = kernels.weight_pack_group.quantize_pack_group
    assert f([], "ternary") == []
    with pytest.raises(ValueError, match="supports ternary, binary"):
        f([torch.randn(4, 4, device=device)], "int8")
    with pytest.raises(ValueError, match="one dtype on one device"):
        f([torch.randn(4, 4, device=device), torch.randn(4, 4, device=device).half()])


def test_group_op_matches_one_quantizer_per_weight(kernels, device):
    """``bitnet::quantize_weights_group``: the flattened ``quantize_weights_kblocked`` of each weight,
    without gradients."""
    g = torch.Generator().manual_seed(2)
    weights = [(torch.randint(-24, 25, s, generator=g) / 8).to(device).requires_grad_() for s in ((8, 300), (3, 5))]
    got = torch.ops.bitnet.quantize_weights_group(weights, "ternary", False)
    want = [t for w in weights for t in torch.ops.bitnet.quantize_weights_kblocked(w, "ternary", False)]
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not any(t.requires_grad for t in got)


# Machine code for the H100 (sm_90), compiled without a GPU (tests/kernels/codegen.py).

GROUP_PACK = """
import sys
sys.path.insert(0, {tools!r})
import sass
from bitcompile.kernels import weight_pack as wp, weight_pack_group as wg
for cfg in wp._configs():
    for dtype in ("*fp32", "*bf16"):
        sass.compile_sm90(wg._abs_sum_group_kernel, dict(T="*i64", W0=dtype, G=42),
                          dict(GP=64, BN=cfg["sum_rows"], BK=cfg["sum_cols"]), cfg["sum_warps"], 3)
        for per_channel in (False, True):
            flags = dict(GP=64, BN=cfg["BN"], PER_CHANNEL=per_channel, SCHEME=0, QB=wp.Q, PARTS=wp.MAX_PARTS)
            sass.compile_sm90(wg._pack_group_kernel, dict(T="*i64", W0=dtype, G=42), flags, cfg["num_warps"], 3)
"""


@needs_ptxas
def test_group_kernels_compile_for_the_h100():
    """The grouped abs-sum and pack (addresses read from a table) compile for sm_90 at every GPU
    configuration of the single-weight kernels."""
    out = compile_in_child(GROUP_PACK)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_group_of_a_llama_layer_on_the_gpu(dtype):
    """One Llama-3-8B decoder layer's seven weights against the reference: scales to fp32 summation
    order, trits equal except within that of the tie |w| = s/2, both layouts of the same codes."""
    from bitcompile.kernels import weight_pack_group

    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
    for w, (codes, scale, blocked) in zip(weights, weight_pack_group.quantize_pack_group(weights)):
        want_codes, want_scale = ref.quantize_weights(w)
        torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
        differ = ref.unpack_weights(codes, w.shape[1]) != ref.unpack_weights(want_codes, w.shape[1])
        gap = ((w.float() / want_scale).abs() - 0.5).abs()[differ]
        assert gap.numel() == 0 or gap.max() < 1e-5
        assert torch.equal(blocked.cpu(), to_kblocked(codes.cpu(), w.shape[1]))
