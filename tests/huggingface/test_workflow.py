"""The transformers workflow through ``bitcompile.compile``: Trainer with default arguments,
``generate`` and ``pipeline`` against the eager reference twin, and the compiled wrapper's
``generate``, which refuses instead of running the float model. Tiny random-init Llama, no downloads."""

import copy
import inspect
import math
import re

import pytest
import torch

import bitcompile
from bitcompile.compile_model import GENERATE_ON_WRAPPER
from bitcompile.nn.reference_model import reference_model
from tests.models.zoo import LLAMA_LINEARS, VOCAB, llama

transformers = pytest.importorskip("transformers")

LINEARS = set(LLAMA_LINEARS)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    model, make_inputs, _ = llama()
    model.generation_config.eos_token_id = None  # greedy runs go the full length
    return model, make_inputs


def rewritten_linears(report) -> set[str]:
    return {layer.module for layer in report.layers if layer.op == "linear" and layer.status == "rewritten"}


def test_compile_checks_options_and_keeps_the_model():
    model, _ = tiny_llama()
    for bad in ({"wieght": "ternary"}, {"exclude": "lm_head"}, {"activation_bits": 1}):
        with pytest.raises(ValueError) as expected:
            bitcompile.BitConfig.from_options(bad)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            bitcompile.compile(model, **bad)
    keys = list(model.state_dict())
    assert bitcompile.compile(model, exclude=["lm_head", "*.down_proj"]) is model
    # Same object, same state dict keys, same forward signature (what Trainer's column filter reads).
    assert list(model.state_dict()) == keys and "input_ids" in inspect.signature(model.forward).parameters
    assert bitcompile.report_of(model).graphs == 0  # nothing compiles before the first call
    with pytest.raises(TypeError, match="not a torch.compile wrapper"):
        bitcompile.compile(torch.compile(model, backend="bitnet"))


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("<unk>", "<pad>", "w2" .. "w63"), built
    offline. (Special tokens are matched inside words, so none may be a prefix of a word.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


@pytest.mark.slow
def test_generate_and_pipeline_match_the_reference_twin():
    from transformers import pipeline

    model, make_inputs = tiny_llama()
    model.eval()
    float_model = copy.deepcopy(model)
    twin = reference_model(model).model  # the same model with eager BitLinear layers
    bitcompile.compile(model)
    prompt = make_inputs(1, 8)["input_ids"]
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
        want = twin.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
        float_tokens = float_model.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
    assert got.shape == (1, 40)
    assert torch.equal(got, want)
    assert not torch.equal(got, float_tokens)  # a float run would be told apart

    report = bitcompile.report_of(model)
    assert report.graphs >= 2  # prefill, then decode steps (one token, growing cache)
    assert all(g.kind == "inference" and g.rewritten >= len(LINEARS) and g.skipped == 1 for g in report.per_graph)
    assert rewritten_linears(report) == LINEARS
    q_proj = next(layer for layer in report.layers if layer.module == "model.layers.0.self_attn.q_proj")
    assert q_proj.graphs == list(range(report.graphs))  # listed once, in every graph
    assert f"{report.graphs} graph(s)" in str(report) and bitcompile.report.LAST is report

    # The same model in a text-generation pipeline, which calls its generate (with the cache on,
    # as above: the graphs compiled there serve it).
    tokenizer = tiny_tokenizer()
    text = " ".join(f"w{i}" for i in prompt[0].clamp(min=2).tolist())
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        text, max_new_tokens=6, do_sample=False, use_cache=True, return_tensors=True
    )
    with torch.no_grad():
        want = twin.generate(tokenizer(text, return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False)
    assert out[0]["generated_token_ids"] == want[0].tolist()


@pytest.mark.slow
def test_a_deployed_model_generates_the_reference_twins_tokens():
    """Packed buffers only (``bitcompile.deploy``), compiled: the float model's fusions apply
    (q/k/v and gate/up as one matmul each) and greedy decoding gives the twin's 32 tokens."""
    model, make_inputs = tiny_llama()
    model.eval()
    twin = reference_model(model).model
    deployed = bitcompile.deploy(copy.deepcopy(model))
    bitcompile.compile(deployed)
    prompt = make_inputs(1, 8)["input_ids"]
    with torch.no_grad():
        got = deployed.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
        want = twin.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
    assert torch.equal(got, want)
    notes = {layer.module: layer.note for layer in bitcompile.report_of(deployed).layers}
    assert "deployed" in notes["model.layers.0.self_attn.q_proj"]
    assert "q_proj + k_proj + v_proj" in notes["model.layers.0.self_attn.q_proj"]
    assert "gate_proj + up_proj" in notes["model.layers.1.mlp.up_proj"]


def test_generate_on_a_bitnet_wrapper_refuses_and_other_backends_are_untouched():
    from transformers import pipeline

    model, make_inputs = tiny_llama()
    model.eval()
    prompt = make_inputs(1, 8)["input_ids"]
    wrapper = torch.compile(model, backend="bitnet")
    assert wrapper.config is model.config  # other attributes still come from the model
    with pytest.raises(RuntimeError, match="bitcompile.compile") as refused:
        wrapper.generate(prompt, max_new_tokens=4, do_sample=False)
    assert str(refused.value) == GENERATE_ON_WRAPPER
    with pytest.raises(RuntimeError, match="bitcompile.compile"):
        pipeline("text-generation", model=wrapper, tokenizer=tiny_tokenizer())("w5 w6", max_new_tokens=2)
    assert bitcompile.report_of(wrapper).graphs == 0

    with torch.no_grad():
        eager = torch.compile(model, backend="eager").generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(eager, model.generate(prompt, max_new_tokens=4, do_sample=False))


@pytest.mark.slow
def test_trainer_trains_the_compiled_model_with_default_arguments(tmp_path):
    """Default TrainingArguments (remove_unused_columns=True, no torch_compile): the Trainer sees
    the model's own class and forward signature."""
    pytest.importorskip("accelerate")  # the Trainer needs it
    from transformers import Trainer, TrainingArguments

    model, make_inputs = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in make_inputs(8, 8)["input_ids"]]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(model=bitcompile.compile(model), args=args, train_dataset=data)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    report = bitcompile.report_of(model)
    assert report.graphs >= 1 and {g.kind for g in report.per_graph} == {"training"}
    assert rewritten_linears(report) == LINEARS
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {f"{path}.weight" for path in LINEARS} <= changed
