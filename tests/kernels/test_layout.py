"""The relayout kernels (``bitcompile/kernels/layout.py``: packed trits to the matmul's K-blocked order and
to the input gradient's transposed operands) and their cache, against ``bitcompile.numerics.packing``."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitcompile.numerics import reference as ref
from tests.kernels.support import dims


@pytest.mark.parametrize("order", ["nibbles", "fields"])
@given(n=st.integers(1, 600), k=dims, seed=st.integers(0, 2**16))
@example(n=256, k=64, seed=0)  # whole blocks, whole row tiles
def test_transposed_kblocked(kernels, device, order, n, k, seed):
    from bitcompile.numerics.packing import pack_ternary, to_kblocked, unpack_ternary

    g = torch.Generator().manual_seed(seed)
    wq, _ = ref.quantize_weights(torch.randn(n, k, generator=g))
    got = kernels.layout.transposed_kblocked(wq.to(device), k, order=order).cpu()
    assert torch.equal(got, to_kblocked(pack_ternary(unpack_ternary(wq, k).t()), n, order))


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


# GPU only (make test-gpu): realistic shapes, compiled kernels.


@pytest.mark.gpu
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
