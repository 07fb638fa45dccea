"""Packed checkpoints: a failed load changes nothing and says what is wrong; what a load
restores is the module's own state (copies, cache clears and grad-enabled eval keep it)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitcompile
from bitcompile.ops import WEIGHT_CACHE
from tests.helpers import MLP


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MLP(d_in=10)
    path = tmp_path / "model.safetensors"
    bitcompile.save_packed(model, path)
    return model, path


def rewrite(path, tmp_path, edit_tensors=None, edit_layers=None, name="bad.safetensors"):
    """A copy of the checkpoint with its tensors or layer metadata edited."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    layers = json.loads(metadata["layers"])
    if edit_layers:
        edit_layers(layers)
    out = tmp_path / name
    save_file(tensors, out, metadata={**metadata, "layers": json.dumps(layers)})
    return out


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(before, model):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def code_three(t):
    t["fc2.weight_packed"][0, 0] = 0xFF  # four codes 3: no trit


CORRUPTIONS = {
    "a later layer's codes are invalid": (dict(edit_tensors=code_three), "fc2.*invalid code 3"),
    "a scale of the wrong shape": (
        dict(edit_tensors=lambda t: t.update({"fc2.weight_scale": torch.ones(2)})),
        "fc2.*weight_scale",
    ),
    "a scale that is not finite": (
        dict(edit_tensors=lambda t: t["fc2.weight_scale"].fill_(float("nan"))),
        "fc2.*finite",
    ),
    "packed codes of the wrong dtype": (
        dict(edit_tensors=lambda t: t.update({"fc2.weight_packed": t["fc2.weight_packed"].to(torch.int16)})),
        "fc2.*weight_packed",
    ),
    "a missing packed tensor": (dict(edit_tensors=lambda t: t.pop("fc2.weight_scale")), "fc2.*missing"),
    "an unknown scheme": (dict(edit_layers=lambda meta: meta["fc2"].update(scheme="quaternary")), "unknown scheme"),
    "a layer the model lacks": (dict(edit_layers=lambda meta: meta.update(fc9=meta["fc2"])), "fc9.*no such"),
    "a wrong in_features": (dict(edit_layers=lambda meta: meta["fc2"].update(k=17)), "does not match"),
    "an unexpected tensor": (dict(edit_tensors=lambda t: t.update({"extra": torch.zeros(1)})), "unexpected"),
    "another tensor of the wrong shape": (
        dict(edit_tensors=lambda t: t.update({"lm_head.weight": torch.zeros(5, 15)})),
        "lm_head.weight",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("deploy", [False, True])
def test_a_failed_load_changes_nothing_and_names_the_entry(saved, tmp_path, corruption, deploy):
    _, path = saved
    edits, message = CORRUPTIONS[corruption]
    bad = rewrite(path, tmp_path, **edits)
    model = MLP(d_in=10)
    before, modules = state(model), list(model.modules())
    with pytest.raises(ValueError, match=message) as err:
        bitcompile.load_packed(model, bad, deploy=deploy)
    assert str(bad) in str(err.value)
    assert unchanged(before, model) and list(model.modules()) == modules


def test_unreadable_files_are_value_errors_and_missing_files_are_named(tmp_path):
    model = MLP(d_in=10)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        bitcompile.load_packed(model, junk)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        bitcompile.load_packed(model, tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="not a readable"):
        bitcompile.load_packed(model, tmp_path)  # a directory
    _, path = MLP(d_in=10), tmp_path / "m.safetensors"
    bitcompile.save_packed(MLP(d_in=10), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(path), tmp_path / "json.safetensors", metadata={**metadata, "layers": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        bitcompile.load_packed(model, tmp_path / "json.safetensors")


def test_files_saved_from_a_compiled_wrapper_load_into_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(d_in=10), torch.randn(3, 10)
    wrapper = torch.compile(model, backend="bitnet")
    path = tmp_path / "wrapped.safetensors"
    bitcompile.save_packed(wrapper, path)
    assert all(not k.startswith("_orig_mod.") for k in load_file(path))
    # A file written with wrapper prefixes (as older versions did) loads too.
    prefixed = tmp_path / "prefixed.safetensors"
    rewrite(
        path,
        tmp_path,
        edit_tensors=lambda t: [t.update({f"_orig_mod.{k}": t.pop(k)}) for k in list(t)],
        edit_layers=lambda meta: [meta.update({f"_orig_mod.{k}": meta.pop(k)}) for k in list(meta)],
        name="prefixed.safetensors",
    )
    for file in (path, prefixed):
        fresh = MLP(d_in=10)
        bitcompile.load_packed(torch.compile(fresh, backend="bitnet"), file, deploy=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), bitcompile.nn.reference_model(model).eval()(x))


@pytest.mark.parametrize("deploy", [False, True])
def test_what_a_load_restores_travels_with_the_module(saved, tmp_path, deploy):
    model, path = saved
    x = torch.randn(4, 10)
    loaded = MLP(d_in=10)
    bitcompile.load_packed(loaded, path, deploy=deploy)
    with torch.no_grad():
        torch._dynamo.reset()
        first = torch.compile(loaded.eval(), backend="bitnet")(x)
    copied = copy.deepcopy(loaded)
    WEIGHT_CACHE.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        after_clear = torch.compile(copied.eval(), backend="bitnet")(x)
        twin = bitcompile.nn.reference_model(loaded).eval()(x)
    torch.testing.assert_close(after_clear, first, rtol=0, atol=0)
    torch.testing.assert_close(twin, first, rtol=0, atol=0)
    if not deploy:  # grad-enabled eval of the float model: same values
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(loaded.eval(), backend="bitnet")(x), first, rtol=0, atol=0)
