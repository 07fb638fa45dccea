"""What the runtime wrapper feeds a compiled graph's hoisted inputs: the packed weights of the
weights it is called with, remembered between calls and looked up again on any change."""

import pytest
import torch

from bitcompile.numerics import reference as ref
from bitcompile.ops import WEIGHT_CACHE
from bitcompile.passes.context import HoistedWeight, ServedWeights


def served_for(weight: torch.Tensor):
    served = ServedWeights([HoistedWeight(1, "ternary", False, "w_packed", "w_scale")])
    x = torch.randn(2, weight.shape[1], device=weight.device)
    return lambda: served([x, weight])


def assert_packs(got, weight):
    want = ref.quantize_weights(weight.detach().cpu(), "ternary", False)
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-6, atol=0)  # the GPU's sum: another order


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_repeated_calls_skip_the_cache_and_changes_are_seen(device):
    # (CUDA builds of torch compare the addresses in C++: the "cuda" case runs that path)
    weight = torch.nn.Parameter(torch.randn(8, 16, device=device))
    call = served_for(weight)
    first = call()
    assert_packs(first, weight)
    lookups = WEIGHT_CACHE.stats.hits + WEIGHT_CACHE.stats.misses
    assert call() is first and WEIGHT_CACHE.stats.hits + WEIGHT_CACHE.stats.misses == lookups
    with torch.no_grad():
        weight.mul_(-1)  # in place: a new version
    assert_packs(call(), weight)
    weight.data = torch.randn(8, 16, device=device)  # new storage, same version
    assert_packs(call(), weight)
    weight.data.mul_(-1)  # bypasses the version counter: seen once the cache is cleared
    WEIGHT_CACHE.clear()
    assert_packs(call(), weight)


def test_another_tensor_in_the_same_position_is_packed_for_itself():
    served = ServedWeights([HoistedWeight(0, "ternary", False, "w_packed", "w_scale")])
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    assert_packs(served([a]), a)
    assert_packs(served([b]), b)


def test_inference_tensors_are_looked_up_on_every_call():
    with torch.inference_mode():
        weight = torch.randn(8, 16)
    call = served_for(weight)
    misses = WEIGHT_CACHE.stats.misses
    call(), call()
    assert WEIGHT_CACHE.stats.misses == misses + 2
