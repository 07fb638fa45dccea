"""Distributed QAT on the CPU: 2 processes (gloo), a tiny transformers Llama, DDP and FSDP2.

``worker.py`` runs on both ranks once for the whole module (``torchrun --standalone``); while it
runs, this process trains the same model on the whole batch (the single-process reference). The
tests compare what the ranks wrote.

Tolerances against the single-process run. Both runs see the same 4 sequences (60 predicted
tokens): each rank the mean loss over its 2 (30 tokens), and DDP / FSDP2 average the two ranks'
gradients, so the reduced gradient is the global mean exactly in real arithmetic (equal token
counts; halving is exact in binary floating point; a sum instead of a mean would be off by 2x).
What differs is the order of additions: a weight's gradient sums over tokens as one sum of 60
in one process, as two sums of 30 added across ranks in two. Per-token values (activation
quantization is per token, weight quantization sees the same full weight) are the same. So:

* step 0, before any update: loss to 1e-6 relative, gradients to 1e-6 absolute (they are at most
  ~0.1, and reordering a float32 sum of 60 such terms moves it by at most ~60 x 6e-8 x 0.1 = 4e-7;
  1.5e-8 measured);
* later steps: the runs' weights then differ by LR x those ~1e-8, and a trit (|w|/s_w near 0.5) or
  an int8 activation code on a rounding boundary can take the other value in one run only, a
  discrete change the following steps carry along (gradients differ by 0.5% at step 2 and 8% at
  step 3 here, with LR 1 SGD). The loss, a mean over 60 tokens, stays close: 1e-3 relative
  (7e-6 measured), against a loss that falls by ~15% per step.

Eval against the eager reference twin: the same bitnet ops on the same integers, but Inductor fuses
the float glue differently, which moves values by ulps (1e-7 relative measured) and can flip an
isolated int8 activation code on a rounding boundary, which depends on the CPU's vector width. One
such flip moves these logits by up to 9e-4 relative (measured on the trained model's twin, flipping
the code nearest a boundary in each quantized activation: an early MLP input at the first token
moves them most; CI saw 9.9e-4 once). The bound, 5e-3, allows a few flips; what it guards against,
logits of stale or partly sharded weights, are off by ~1 (the logits before and after training
differ by 0.96).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import worker
from tests.distributed.launch import Launch
from tests.models.zoo import LLAMA_LINEARS

pytest.importorskip("transformers")

NORMS = ("input_layernorm", "post_attention_layernorm")
STEP0 = dict(rtol=1e-5, atol=1e-6)  # gradients at step 0 (see the module docstring)
LOSS_RTOL = 1e-3  # losses of later steps
EVAL_REL = 5e-3  # compiled eval logits against the eager twin (a few rounding flips)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"ranks": [rank 0's results, rank 1's], "single": the single-process run}``."""
    out = tmp_path_factory.mktemp("distributed")
    launch = Launch(["tests/distributed/worker.py", str(out)])
    try:
        single = worker.single_process()  # meanwhile, in this process
    finally:
        launch.wait()
    return {"ranks": [torch.load(out / f"rank{r}.pt") for r in range(2)], "single": single}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


LINEAR_PATHS = set(LLAMA_LINEARS) | {"lm_head"}
NORM_PATHS = {f"model.layers.{i}.{name}" for i in range(2) for name in NORMS}
ATTENTION_PATHS = {f"model.layers.{i}.self_attn" for i in range(2)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_loss_decreases(runs, mode):
    losses = runs["ranks"][0][mode]["losses"]
    assert len(losses) == worker.STEPS and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradients_and_parameters_agree_across_ranks(runs, mode):
    """All-gathered on the ranks: every rank holds the same reduced gradients (step 0) and the same
    parameters after training, bit for bit (FSDP2: the full tensors, from full_tensor())."""
    for rank in runs["ranks"]:
        grads, params = rank[mode]["gathered_grads"], rank[mode]["gathered_params"]
        assert len(grads) == 2 and torch.equal(grads[0], grads[1])
        assert torch.equal(params[0], params[1])
    assert runs["ranks"][0][mode]["losses"] == runs["ranks"][1][mode]["losses"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_by_name"])
def test_matches_single_process_on_the_whole_batch(runs, mode):
    got, want = runs["ranks"][0][mode], runs["single"]
    torch.testing.assert_close(got["losses"][0], want["losses"][0], rtol=1e-6, atol=0)
    for name, grad in want["grads"][0].items():
        torch.testing.assert_close(got["grads"][0][name], grad, **STEP0, msg=lambda m: f"{mode} {name}: {m}")
    steps = len(got["losses"])
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(want["losses"][:steps]), rtol=LOSS_RTOL, atol=0
    )


def test_fsdp_shards_the_weights(runs):
    """The check below is about sharded weights: each rank holds half the rows of each."""
    rank = runs["ranks"][0]["fsdp"]
    for name, full in rank["initial"].items():
        assert rank["local_shapes"][name] == ((full.shape[0] + 1) // 2, *full.shape[1:]), name


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_weight_scales_come_from_the_whole_weight(runs, mode):
    """The QAT graphs quantize full weights: each ``bitnet::quantize_weights`` call of the first
    step got one whole initial weight (FSDP2 all-gathers before the forward, so the graph never
    sees the local shard), its scale is that tensor's absmean, and both ranks used the same."""
    initial = runs["ranks"][0]["fsdp"]["initial"]  # the same seed for every run
    linears = {f"{path}.weight" for path in LLAMA_LINEARS}
    for r, rank in enumerate(runs["ranks"]):
        calls = rank[mode]["quantized"]
        assert len(calls) == len(linears)  # lm_head is excluded, the rest once each
        seen = set()
        for weight, scale in calls:
            names = [n for n in linears if torch.equal(initial[n], weight)]
            assert len(names) == 1, f"rank {r}: a quantized weight of shape {list(weight.shape)} is no full weight"
            seen.add(names[0])
            absmean = weight.abs().mean().clamp_min(1e-5).reshape(1)
            torch.testing.assert_close(scale, absmean, rtol=1e-6, atol=0)
        assert seen == linears
    for (_, s0), (_, s1) in zip(runs["ranks"][0][mode]["quantized"], runs["ranks"][1][mode]["quantized"]):
        assert torch.equal(s0, s1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_eval_after_training_matches_the_reference_twin(runs, mode):
    """Compiled eval (packed weights) against ``reference_model`` of an undistributed model holding
    the trained weights; FSDP2 also before training, so packed weights cached by the first eval
    cannot be served to the second."""
    for rank in runs["ranks"]:
        for key in ("eval", "eval_before") if mode == "fsdp" else ("eval",):
            logits = rank[mode][key]
            assert rel_err(logits["compiled"], logits["twin"]) < EVAL_REL, key
    before, after = runs["ranks"][0]["fsdp"]["eval_before"], runs["ranks"][0]["fsdp"]["eval"]
    assert rel_err(before["compiled"], after["compiled"]) > 0.01  # training changed the model


@pytest.mark.parametrize("mode", ["ddp", "ddp_by_name", "fsdp"])
def test_report_lists_every_layer_once_with_its_full_path(runs, mode):
    report = runs["ranks"][0][mode]["report"]
    layers = [(module, op) for module, op, _, _ in report["layers"]]
    assert len(layers) == len(set(layers)), report["text"]
    assert {module for module, op in layers if op == "linear"} == LINEAR_PATHS, report["text"]
    norms = {module for module, op in layers if op not in ("linear", "attention")}
    # float attention rewritten (a constant causal mask run as is_causal), where a graph holds one
    assert {module for module, op in layers if op == "attention"} <= ATTENTION_PATHS, report["text"]
    # A norm fuses with the quantization of the linears it feeds when they are in its graph: a DDP
    # bucket boundary between them leaves both unfused (a norm, then a separate quantization).
    assert (norms == NORM_PATHS) if mode == "fsdp" else (norms <= NORM_PATHS), report["text"]
    status = {module: s for module, _, _, s in report["layers"]}
    assert all(s == "rewritten" for m, s in status.items() if m != "lm_head") and status["lm_head"] == "skipped"
    if mode != "fsdp":
        # Dynamo's DDP optimizer: one graph per ~40 kB gradient bucket, each layer in one of them.
        training = [i for i, kind in enumerate(report["kinds"]) if kind == "training"]
        assert len(training) >= 2, report["text"]
        for module, _, graphs, _ in report["layers"]:
            assert len(set(graphs) & set(training)) == 1, (module, graphs)
    else:
        # FSDP2: a graph break at each sharded layer's hooks, and one graph (per grad mode) serves
        # both decoder layers: the report lists each layer under its own path in that graph.
        shared = {tuple(graphs) for module, _, graphs, _ in report["layers"] if module.startswith("model.layers.")}
        assert len(shared) == 1, report["text"]
        assert sorted(report["kinds"][g] for g in next(iter(shared))) == ["inference", "training"]
    if report["weight_memory"] is not None:  # bitcompile.compile: the report knows its model
        full, deployed = report["weight_memory"]
        assert deployed < full / 3, report["text"]
