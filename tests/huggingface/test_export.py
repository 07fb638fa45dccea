"""transformers' BitNet format: ``export_transformers`` writes what ``from_pretrained`` loads as
``BitLinear`` layers, ``load_transformers`` reads it back into a float (or deployed) model, and both
compute the compiled model's logits within ``tolerance``. Tiny random-init Llama, CPU, no downloads."""

import copy
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.nn.packed_linear import PackedLinear
from bitcompile.numerics import reference as ref
from tests.models.zoo import LLAMA_LINEARS, VOCAB, llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet loader needs it
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.bitnet import BitLinear  # noqa: E402

LINEARS = list(LLAMA_LINEARS)
# bitcompile rounds x / (amax/127) and multiplies by s_x * s_w; transformers rounds x * (127/amax)
# and divides. Apart from float32 rounding (~1e-7 of the logits), an activation within rounding error
# of a .5 boundary can take the neighbouring code: one such flip moves the tiny model's logits by
# at most ~0.2% of their range (test_one_flipped_code_stays_within_the_tolerance), so 0.5% of it.
RELATIVE_TOLERANCE = 5e-3


def tolerance(logits: torch.Tensor) -> float:
    return RELATIVE_TOLERANCE * float(logits.abs().max())


def tiny_llama(seed=0, **config):
    torch.manual_seed(seed)
    model, _, _ = llama()
    if config:
        model = type(model)(type(model.config)(**{**model.config.to_dict(), **config}))
    return model.eval()


def inputs(batch=4, seq=16):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def compiled_logits(model, ids):
    with torch.no_grad():
        return bitcompile.compile(model)(ids).logits


def transformers_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama exported, transformers' model of it and both logits (computed once)."""
    model = tiny_llama()
    directory = tmp_path_factory.mktemp("bitnet")
    state, config = copy.deepcopy(model.state_dict()), model.config.to_dict()
    layers = bitcompile.export_transformers(model, directory)
    unchanged = config == model.config.to_dict() and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items()
    )
    theirs = AutoModelForCausalLM.from_pretrained(directory)
    ids = inputs()
    return {
        "model": model,
        "dir": directory,
        "layers": layers,
        "unchanged": unchanged,
        "hf": theirs,
        "ids": ids,
        "ours": compiled_logits(copy.deepcopy(model), ids),
        "theirs": transformers_logits(theirs, ids),
    }


def test_export_loads_as_transformers_bitlinear_with_our_logits(exported):
    theirs, directory = exported["hf"], exported["dir"]
    assert exported["layers"] == dict.fromkeys(LINEARS, "ternary") and exported["unchanged"]
    assert sorted(os.listdir(directory)) == ["config.json", "generation_config.json", "model.safetensors"]
    settings = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "bitnet" and settings["linear_class"] == "bitlinear"
    assert settings["quantization_mode"] == "offline" and settings["modules_to_not_convert"] == ["lm_head"]
    assert {name for name, m in theirs.named_modules() if isinstance(m, BitLinear)} == set(LINEARS)
    assert type(theirs.lm_head) is nn.Linear

    ours, want = exported["ours"], exported["theirs"]
    diff = float((ours - want).abs().max())
    assert diff <= tolerance(want), f"max |logits diff| {diff} > {tolerance(want)}"
    with torch.no_grad():  # the float model is far outside the tolerance: the comparison tells formats apart
        assert float((exported["model"](exported["ids"]).logits - want).abs().max()) > 10 * tolerance(want)


def test_import_from_directory_and_from_transformers_model(exported):
    want = exported["theirs"]
    for source in (exported["dir"], exported["hf"]):
        model = bitcompile.load_transformers(source)
        assert type(model) is type(exported["model"]) and not hasattr(model.config, "quantization_config")
        assert all(type(model.get_submodule(name)) is nn.Linear for name in LINEARS) and not model.training
        got = compiled_logits(model, exported["ids"])
        assert float((got - want).abs().max()) <= tolerance(want)
        torch._dynamo.reset()

    deployed = bitcompile.load_transformers(exported["dir"], deploy=True)
    assert all(type(deployed.get_submodule(name)) is PackedLinear for name in LINEARS)
    with torch.no_grad():
        got = deployed(exported["ids"]).logits  # eager PackedLinear layers
    assert float((got - want).abs().max()) <= tolerance(want)


def test_import_reads_autobitlinear_checkpoints(exported, tmp_path):
    """transformers' other BitNet layer (offline AutoBitLinear, as BitNet b1.58 2B4T ships): packed
    weights, and weight_scale = s_w, which it multiplies by."""
    tensors = load_file(exported["dir"] / "model.safetensors")
    tensors.update({key: 1 / value for key, value in tensors.items() if key.endswith(".weight_scale")})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((exported["dir"] / "config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    ours = bitcompile.load_transformers(tmp_path, deploy=True)
    with torch.no_grad():
        want, got = theirs(exported["ids"]).logits, ours(exported["ids"]).logits
    assert float((got - want).abs().max()) <= tolerance(want)


def test_export_import_export_is_bitwise(exported, tmp_path):
    first = load_file(exported["dir"] / "model.safetensors")
    for deploy in (False, True):
        model = bitcompile.load_transformers(exported["dir"], deploy=deploy)
        again = tmp_path / f"deploy-{deploy}"
        bitcompile.export_transformers(model, again)
        second = load_file(again / "model.safetensors")
        assert second.keys() == first.keys()
        assert [key for key in first if not torch.equal(first[key], second[key])] == []
        assert (
            json.loads((again / "config.json").read_text())["quantization_config"]
            == json.loads((exported["dir"] / "config.json").read_text())["quantization_config"]
        )


def test_export_from_packed_checkpoints_matches_the_float_export(exported, tmp_path):
    bitcompile.save_packed(exported["model"], tmp_path / "packed.safetensors")
    first = load_file(exported["dir"] / "model.safetensors")
    for deploy in (False, True):
        model = tiny_llama(seed=1)
        bitcompile.load_packed(model, tmp_path / "packed.safetensors", deploy=deploy)
        bitcompile.export_transformers(model, tmp_path / str(deploy))
        second = load_file(tmp_path / str(deploy) / "model.safetensors")
        differ = [key for key in first if not torch.equal(first[key], second[key])]
        # load_packed's latent weights re-derive each scale within a float32 ulp or two; deployed
        # layers keep the saved scale.
        assert all(key.endswith(".weight_scale") for key in differ) and not (deploy and differ)
        for key in differ:
            torch.testing.assert_close(second[key], first[key], rtol=3e-7, atol=0)
    deployed = bitcompile.deploy(tiny_llama())  # a model in memory, deployed
    bitcompile.export_transformers(deployed, tmp_path / "deployed")
    assert all(torch.equal(v, first[k]) for k, v in load_file(tmp_path / "deployed" / "model.safetensors").items())


def test_imported_model_trains(exported):
    model = bitcompile.load_transformers(exported["dir"]).train()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in LINEARS}
    bitcompile.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = exported["ids"]
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(model.get_submodule(name).weight, before[name]) for name in LINEARS)


def test_tied_lm_head_stays_float_with_the_embedding(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    bitcompile.export_transformers(model, tmp_path, exclude=[])  # tied: float even when not excluded
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == [
        "lm_head"
    ]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(theirs.lm_head) is nn.Linear and theirs.lm_head.weight is theirs.model.embed_tokens.weight
    back = bitcompile.load_transformers(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_one_flipped_code_stays_within_the_tolerance():
    """The tolerance's justification: the eager quantized model with one activation code moved to
    its other neighbour (what a value on a .5 boundary can do), at random layers and places."""
    model = tiny_llama()
    linears = {name: model.get_submodule(name) for name in LINEARS}
    flip = {}

    def quantized_forward(name, layer):
        packed, s_w = ref.quantize_weights(layer.weight.detach())
        w_int = ref.unpack_weights(packed, layer.in_features, torch.float32)

        def forward(x):
            q, s_x = ref.quantize_activations(x)
            q = q.float()
            if flip.get("name") == name:
                rows, exact = q.view(-1, q.shape[-1]), (x.float() / s_x).reshape(-1, q.shape[-1])
                r, k = flip["row"] % rows.shape[0], flip["col"] % rows.shape[1]
                rows[r, k] += 1.0 if exact[r, k] >= rows[r, k] else -1.0
            return (q @ w_int.t() * s_x * s_w).to(x.dtype)

        return forward

    for name, layer in linears.items():
        layer.forward = quantized_forward(name, layer)
    ids, pick = inputs(), random.Random(0)
    with torch.no_grad():
        base = model(ids).logits
        worst = 0.0
        for _ in range(60):
            flip.update(name=pick.choice(LINEARS), row=pick.randrange(64), col=pick.randrange(64))
            worst = max(worst, float((model(ids).logits - base).abs().max()))
    assert 0 < worst <= tolerance(base) / 2


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    model = tiny_llama()
    for options, match in (
        ({"activation_bits": 4}, "activation_bits=4"),
        ({"weight": "int8"}, "weight='int8'"),
        ({"granularity": "per_channel"}, "'per_channel'"),
        ({"attention_bits": 8}, "attention_bits=8"),
    ):
        with pytest.raises(ValueError, match="BitNet format holds ternary weights with one scale per tensor") as err:
            bitcompile.export_transformers(model, tmp_path, **options)
        assert match in str(err.value)
    bitcompile.deploy(model, granularity="per_channel")
    with pytest.raises(ValueError, match="deployed layer 'model.layers.0.self_attn.q_proj' holds ternary per-channel"):
        bitcompile.export_transformers(model, tmp_path)
    odd = tiny_llama(intermediate_size=66)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' has out_features=66.*multiple of 4"):
        bitcompile.export_transformers(odd, tmp_path)
    bitcompile.export_transformers(odd, tmp_path, exclude=["lm_head", "gate_proj", "up_proj"])  # float there
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"nn.Linear layers only.*'transformer.h.0.attn.c_attn'"):
        bitcompile.export_transformers(gpt2, tmp_path)
    with pytest.raises(TypeError, match="takes a transformers model"):
        bitcompile.export_transformers(nn.Linear(4, 4), tmp_path)


def test_import_names_the_file_and_entry_it_cannot_use(exported, tmp_path):
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)
    with pytest.raises(ValueError, match=r"config.json: no quantization_config: not a transformers BitNet checkpoint"):
        bitcompile.load_transformers(float_dir)
    with pytest.raises(FileNotFoundError):
        bitcompile.load_transformers(tmp_path / "nothing")

    def broken(edit_tensors=None, edit_config=None):
        target = tmp_path / f"broken{len(os.listdir(tmp_path))}"
        target.mkdir()
        tensors = load_file(exported["dir"] / "model.safetensors")
        config = json.loads((exported["dir"] / "config.json").read_text())
        (edit_tensors or (lambda t: None))(tensors)
        (edit_config or (lambda c: None))(config)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(config))
        return target

    q = "model.layers.0.self_attn.q_proj"
    cases = [
        (
            broken(lambda t: t.pop(f"{q}.weight_scale")),
            rf"model.safetensors: BitNet layer '{q}': '{q}.weight_scale' is missing",
        ),
        (
            broken(lambda t: t.update({f"{q}.weight": t[f"{q}.weight"][:4]})),
            rf"model.safetensors: BitNet layer '{q}': '{q}.weight' is uint8 \[4, 32\], expected uint8 \[8, 32\]",
        ),
        (broken(lambda t: t.update({f"{q}.weight": torch.full((8, 32), 255, dtype=torch.uint8)})), "invalid code 3"),
        (broken(lambda t: t.update({f"{q}.weight_scale": torch.tensor([-1.0])})), "finite and > 0"),
        (broken(lambda t: t.pop("model.norm.weight")), r"model.safetensors: missing entries \['model.norm.weight'\]"),
        (
            broken(lambda t: t.update({"model.norm.weight": torch.ones(3)})),
            r"'model.norm.weight' has shape \[3\], the model's \[32\]",
        ),
        (broken(lambda t: t.update({"extra": torch.ones(1)})), r"entries the model does not have: \['extra'\]"),
        (
            broken(edit_config=lambda c: c["quantization_config"].update(quant_method="gptq")),
            r"config.json: quantization_config.quant_method is 'gptq', not 'bitnet'",
        ),
    ]
    for directory, match in cases:
        with pytest.raises(ValueError, match=match):
            bitcompile.load_transformers(directory)
    with pytest.raises(TypeError, match="deploy must be True or False"):
        bitcompile.load_transformers(exported["dir"], deploy="yes")


@pytest.mark.slow  # ~1 min: it compiles a QAT training graph and transformers compiles BitLinear's helpers
def test_llm_qat_example_runs(tmp_path):
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "examples/llm_qat.py", "--tiny", "--steps", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "perplexity" in out.stdout and "sample:" in out.stdout
    assert (tmp_path / "bitnet" / "config.json").exists()
    assert time.perf_counter() - start < 120
