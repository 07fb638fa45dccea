"""The backend as a user meets it: entry point, inference cache, training, modes."""

import subprocess
import sys
import uuid

import pytest
import torch

import bitcompile
from bitcompile.ops import WEIGHT_CACHE
from tests.helpers import MLP, swap_to_bitlinear


def test_backend_name_works_in_a_fresh_interpreter_without_import():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(8, 4)\n"
        "torch.compile(m, backend='bitnet')(torch.randn(2, 8))\n"
        "assert 'bitcompile' in sys.modules  # loaded through the torch_dynamo_backends entry point\n"
        "print(type(sys.modules['bitcompile.report'].LAST.candidates[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Candidate"


def test_import_is_cheap():
    code = (
        "import sys, bitcompile, bitcompile.nn; "
        "print([m for m in ('triton', 'torch._inductor.compile_fx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inference_packs_once_and_picks_up_parameter_updates():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 12)
    compiled = torch.compile(model, backend="bitnet")
    model.eval()
    with torch.no_grad():
        first = compiled(x)
        packs = WEIGHT_CACHE.stats.misses  # fc1, fc2 packed once, at compile time
        for _ in range(5):
            torch.testing.assert_close(compiled(x), first, rtol=0, atol=0)
    assert packs == 2 and WEIGHT_CACHE.stats.misses == 2

    # An optimizer step (in-place update) is picked up on the next call.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    compiled(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = compiled(x)
        assert WEIGHT_CACHE.stats.misses == 4
        torch.testing.assert_close(after, swap_to_bitlinear(model)(x), rtol=0, atol=0)
        assert not torch.equal(after, first)

    # So is load_state_dict (copy_ into the same parameters).
    other = MLP()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), swap_to_bitlinear(other)(x), rtol=0, atol=0)

    # New storage (`.data = ...`), and edits that bypass the version counter once the cache is
    # cleared, as the README says.
    with torch.no_grad():
        model.fc1.weight.data = -model.fc1.weight.data.clone()
        torch.testing.assert_close(compiled(x), swap_to_bitlinear(model)(x), rtol=0, atol=0)
        model.fc2.weight.data.mul_(-1)
        WEIGHT_CACHE.clear()
        torch.testing.assert_close(compiled(x), swap_to_bitlinear(model)(x), rtol=0, atol=0)


def test_qat_training_reduces_loss_and_eval_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    y = (x[:, :5] * 2).argmax(-1)  # a learnable rule
    model = MLP()
    compiled = torch.compile(model, backend="bitnet")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), swap_to_bitlinear(model)(x), rtol=0, atol=0)


def test_a_recompile_traces_the_current_ste_backward(monkeypatch):
    """What our ops trace into a graph (the STE backward here; on CUDA also the Triton launches
    with this process's tuned configurations) is not in the graph Dynamo hands over, which is all
    AOTAutograd's on-disk cache keys on: a hit would replay what another process or an older
    bitcompile traced. After the backward changes, a recompile must use the new one."""
    from bitcompile.numerics import reference as ref

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(12, 8), torch.randn(4, 12)
    torch.compile(layer, backend="bitnet")(x).sum().backward()
    before, layer.weight.grad = layer.weight.grad.clone(), None
    dequantized = ref.dequantized_activations
    monkeypatch.setattr(ref, "dequantized_activations", lambda *args: 2 * dequantized(*args))
    torch._dynamo.reset()
    torch.compile(layer, backend="bitnet")(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, 2 * before, rtol=0, atol=0)


def test_inductor_cache_keys_on_bitcompile_source(monkeypatch):
    """Inductor's on-disk FX graph cache keys on the traced graph, which does not show our ops'
    fake kernels or eager code: a compile must miss after bitcompile's source changes (a stale
    entry failed its stride check when the per-sample quantizer went channels-last) and hit
    while it stays the same."""
    from torch._dynamo.utils import counters

    from bitcompile import backend

    layer, x = torch.nn.Linear(12, 8), torch.randn(4, 12)

    def compile_once():
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True):
            torch.compile(layer, backend="bitnet")(x)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    compile_once()
    assert compile_once() == (1, 0)
    other = f"another bitcompile {uuid.uuid4()}"  # never compiled before, in any run
    monkeypatch.setattr(backend, "source_hash", lambda: other)
    assert compile_once() == (0, 1)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_inductor_modes_are_accepted(mode):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 12)
    out = torch.compile(model, backend="bitnet", mode=mode)(x)
    torch.testing.assert_close(out, swap_to_bitlinear(model)(x), rtol=0, atol=0)


def test_cpp_wrapper_option_reaches_inductor_and_keeps_the_results(monkeypatch):
    # options={"cpp_wrapper": True}: Inductor compiles the graphs' launching code as C++ (less
    # host time per step); a training step gives the Python wrapper's output and gradients.
    import torch._inductor.compile_fx as inductor

    patches, original = [], inductor.compile_fx
    monkeypatch.setattr(
        inductor, "compile_fx", lambda *a, **kw: patches.append(kw.get("config_patches")) or original(*a, **kw)
    )
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 12, requires_grad=True)
    results = []
    for options in ({}, {"cpp_wrapper": True}):
        torch._dynamo.reset()
        out = torch.compile(model, backend="bitnet", options=options)(x)
        out.sum().backward()
        results.append([out.detach(), x.grad, model.fc1.weight.grad])
        x.grad = None
        model.zero_grad()
    # (each followed by Inductor's own call inside the patch, without one); the cubins stored
    # for the backward too
    plain, cpp = [p for p in patches if p]
    assert "cpp_wrapper" not in plain and cpp["cpp_wrapper"] and cpp["triton.store_cubin"]
    for plain, cpp in zip(*results):
        torch.testing.assert_close(cpp, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="invalid cpp_wrapper='yes'; valid choices: False, True"):
        bitcompile.BitConfig(cpp_wrapper="yes")
    with pytest.raises(ValueError, match="cpp_wrapper=True and mode='reduce-overhead'"):
        bitcompile.BitConfig(cpp_wrapper=True, mode="reduce-overhead")


def test_cpp_wrapper_inference_with_fusions_and_hoisted_weights():
    # The fused ops and the packed weights fed to the graph at run time under the C++ wrapper
    # (that the option reaches Inductor is checked above).
    from tests.passes.fusion_models import Block

    torch.manual_seed(0)
    model = Block(d=16, hidden=24).eval()
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    outs = []
    with torch.no_grad():
        for options in ({}, {"cpp_wrapper": True}):
            torch._dynamo.reset()
            outs.append(torch.compile(model, backend="bitnet", options=options)(x, r))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_inference_mode_and_bf16():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16).eval()
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = torch.compile(model, backend="bitnet")(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, swap_to_bitlinear(model)(x), rtol=0, atol=0)


def test_aot_sees_parameters_and_packed_weights_as_static_inputs(monkeypatch):
    # CUDA graphs copy every non-static input into their buffers on each replay: the graph
    # the passes rewrite must keep Dynamo's parameter metadata, and the hoisted packed
    # weights must be marked static, or every weight would be copied on every call. The latent
    # weights they are packed from are not graph inputs at all (the runtime wrapper reads them).
    import torch._functorch.aot_autograd as aot

    seen = []
    original = aot._try_get_metadata_from_dynamo

    def spy(mod, *args, **kwargs):
        sources, static = original(mod, *args, **kwargs)
        seen.append((mod, static))
        return sources, static

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        torch.compile(model, backend="bitnet")(torch.randn(3, 8))
    ((mod, static),) = seen
    names = [n.name for n in mod.graph.find_nodes(op="placeholder")]
    static_names = {names[i] for i in static}
    assert {n for n in names if n.endswith(("_packed", "_scale"))} <= static_names and len(static_names) == 6
    assert not [n for n in names if "weight" in n and not n.endswith(("_packed", "_scale"))]
    assert not any("l_input" in n or "args" in n for n in static_names)  # the activation is not static
