"""Torch's analysis of our Triton launches is memoized per kernel, argument dtypes and constants."""

import types

import pytest
import torch

from bitcompile.ops import kernel_analysis


def _kernel(module: str):
    fn = types.FunctionType(compile("def k(): pass", module, "exec").co_consts[0], {})
    fn.__module__ = module
    return types.SimpleNamespace(fn=fn)


def _counting():
    seen = []

    def analyse(kernel, kwargs, tma):
        seen.append(dict(kwargs))
        return [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]

    return kernel_analysis.memoized(analyse), seen


def test_one_analysis_per_kernel_dtypes_and_constants():
    analysis, seen = _counting()
    ours = _kernel("bitcompile.kernels.example")
    a = analysis(ours, {"x": torch.zeros(3), "n": 3, "BLOCK": 64}, {})
    b = analysis(ours, {"x": torch.ones(5), "n": 3, "BLOCK": 64}, {})  # another tensor, same dtype
    assert a == b == ["x"] and len(seen) == 1
    analysis(ours, {"x": torch.zeros(3, dtype=torch.bfloat16), "n": 3, "BLOCK": 64}, {})  # another dtype
    analysis(ours, {"x": torch.zeros(3), "n": 4, "BLOCK": 64}, {})  # another constant
    assert len(seen) == 3
    a.append("mutated by a caller")
    assert analysis(ours, {"x": torch.zeros(3), "n": 3, "BLOCK": 64}, {}) == ["x"] and len(seen) == 3


def test_launch_options_wrapped_per_launch_share_the_analysis():
    # torch wraps each launch's options (num_warps...) in a new Autotuner around the same kernel
    analysis, seen = _counting()
    ours = _kernel("bitcompile.kernels.example")
    config = types.SimpleNamespace(kwargs={"BLOCK": 64})
    for _ in range(3):
        analysis(types.SimpleNamespace(fn=ours, configs=[config]), {"x": torch.zeros(3)}, {})
    assert len(seen) == 1
    analysis(
        types.SimpleNamespace(fn=ours, configs=[types.SimpleNamespace(kwargs={"BLOCK": 32})]), {"x": torch.zeros(3)}, {}
    )
    assert len(seen) == 2


def test_other_kernels_and_unkeyable_arguments_are_analysed_every_time():
    analysis, seen = _counting()
    theirs = _kernel("user_code.kernels")
    for _ in range(2):
        analysis(theirs, {"x": torch.zeros(3)}, {})
    ours = _kernel("bitcompile.kernels.example")
    for _ in range(2):
        analysis(ours, {"x": torch.zeros(3), "descriptor": object()}, {})
    assert len(seen) == 4


def test_install_wraps_torchs_analysis_once():
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    kernel_analysis.install()
    wrapped = [getattr(wrap, name) for name in kernel_analysis.ANALYSES if hasattr(wrap, name)]
    assert wrapped and all(hasattr(fn, "bitcompile_memo") for fn in wrapped)
    kernel_analysis.install()
    assert [getattr(wrap, name) for name in kernel_analysis.ANALYSES if hasattr(wrap, name)] == wrapped


@pytest.mark.gpu
def test_compiled_layers_reuse_the_analysis_and_it_matches_torchs(monkeypatch):
    # Three identical blocks: each launch of the second and third is answered from the first's
    # analysis, and every answer given equals what torch computes for that launch itself.
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    from tests.passes.fusion_models import Block

    kernel_analysis.install()
    name = next(n for n in kernel_analysis.ANALYSES if hasattr(wrap, n))
    memo = getattr(wrap, name)
    launches = []

    def recording(kernel, kwargs, *rest):
        answer = memo(kernel, kwargs, *rest)
        if kernel_analysis._ours(kernel):
            launches.append((kernel, dict(kwargs), rest, answer))
        return answer

    recording.bitcompile_memo = memo.bitcompile_memo  # installed: later twins must not wrap it again
    monkeypatch.setattr(wrap, name, recording)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block(d=256, hidden=512) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x, x)
            return x

    torch.manual_seed(0)
    model = Stack().to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.compile(model, backend="bitnet")(x)
    keys = {kernel_analysis.launch_key(k, kw, *rest) for k, kw, rest, _ in launches}
    assert len(launches) >= 3 * len(keys), kernel_analysis.summary()
    for kernel, kwargs, rest, answer in launches:
        assert memo.__wrapped__(kernel, kwargs, *rest) == answer
