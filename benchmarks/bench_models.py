"""Whole-model speed: transformers Llama-shaped models, bitnet against bf16 Inductor in one process.

    python benchmarks/bench_models.py [--part decode,prefill,layers,qat] [--out FILE] [--smoke]

Every row compiles both sides the same way in this process and reports their ratio.

- decode: a Llama-3-8B-shaped LlamaForCausalLM (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab
  128256; ``--layers``, 16 by default; random init, bf16), greedy ``generate`` with a static cache,
  the forward compiled with CUDA graphs (``mode="reduce-overhead"``) on both sides: bf16 Inductor,
  and the model after ``bitcompile.deploy`` (packed weights only) compiled with ``backend="bitnet"``.
  Tokens/s from the difference of two generate lengths (prefill and setup cancel), at batch 1 and 8
  (``--batches``), and the compiled decode step's time alone (a plain loop, no ``generate`` around
  it), once with the position sent from the host every token (host and GPU time add up, as in
  ``generate``) and once kept on the GPU (the host runs ahead: the larger of the two); the first
  generate's wall time (compile + graph capture); the side's peak GPU memory
  (its model's state plus what decoding allocates); at each batch size, the first 32 decode steps'
  logits against an eager forward over the same tokens: the bf16 model's for bf16 (the noise
  compiling alone brings), the reference twin's for bitnet, within ``LOGIT_TOLERANCE`` times that
  noise (``within``).
- prefill: the same models' forward over a 2048-token prompt (CUDA graphs), with the logits of
  the last position only, as ``generate``'s prefill computes them (``--prefill-logits all``: of
  every position, which adds the same 2048-row bf16 ``lm_head`` GEMM, ~3 ms, to both sides).
  ``--int8-head``: the deployed model again with its ``lm_head`` in int8 (weight-only,
  ``deploy(excluded_weights="int8")``), the same rows against the same bf16 side.
- layers: a stack of independent compiled ``nn.Linear`` layers (each its own input), per layer;
  where gemlite is installed, its A8W158 layer (int8 activations quantized per token in the call,
  ternary weights; a peer's Triton kernels) as a third side, compiled the same way.
- qat: a full training step (forward, backward, fused AdamW) of Llama-shaped models with 8192 tokens,
  under three recipes (bf16 parameters; fp32 parameters with bf16 autocast; fp32), for Inductor, the
  usual fake-quant BitLinear formula under Inductor, bitnet (exact STE) and bitnet with
  ``grad_input_bits=8``, per step from runs of 4 consecutive steps (a loop that does not wait for
  each loss); the first step's wall time and peak memory. ``--qat-mode reduce-overhead``
  compiles every side with CUDA graphs (forward and backward graphs replayed; the optimizer eager).
  ``--group-weight-pack``: also bitnet with every graph's weight quantizers in one grouped call
  (``bitnet grouped``, ``BITCOMPILE_GROUP_WEIGHT_PACK=1``).

``--without-passes NAME,...`` runs every bitnet side without those compiler passes (an A/B of one
pass, the bf16 side re-measured in the same run); each row then names them (``without``).
``--variants NAME:VAR=VALUE,...`` adds decode and prefill sides of the same deployed model compiled
under those environment variables (opt-in passes: an A/B against the default build without a
second bf16 compile), each named in its rows, and a bitnet column per variant to the layer rows.

Results: one JSON object per row on stdout (also appended to ``--jsonl``), and a markdown table in
``--out``; ``--profile FILE``: each decode step's and QAT step's kernel table (device time per
kernel) and host table (CPU time per operator) against its step time, and the host time per
step split at the compiled graphs' calls, by clocks (``timing.host_phases``), appended to FILE.
``--smoke`` runs tiny shapes on any device (the CPU in CI): it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
from bitcompile.nn import reference_model

import profiling
import timing
from model_shapes import LLAMA3_8B, QAT_SIZES, SMOKE

RECIPES = ("bf16", "fp32+autocast", "fp32")
STEPS_PER_RUN = 4  # QAT steps timed together
# Compiled bitnet against its eager twin may differ by this multiple of what compiling the bf16
# model alone changes (Inductor against eager, same tokens). Why: in bf16 an activation's last bit
# is ~0.4% of it, so kernels that round a norm or a product differently move int8 codes by one
# step; the bf16 model's own compile difference measures how much this model amplifies last-bit
# differences over its layers, and the quantized model adds one rounding (the codes) per linear.
# A wrong kernel shows up as errors of the order of the logits themselves.
LOGIT_TOLERANCE = 3.0


def llama(layers: int, shapes: dict, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
        **shapes,
    )
    with torch.device(timing.DEVICE):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def emit(rows: list, args, **row) -> None:
    if args.without_passes:
        row["without"] = "+".join(args.without_passes)
    rows.append(row)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if timing.CUDA else 0.0


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def reset_peak() -> None:
    gc.collect()
    if timing.CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the layers the backend quantizes (linears but lm_head)."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, bitcompile.nn.PackedLinear):
            total += sum(b.numel() * b.element_size() for b in (module.weight_packed, module.weight_scale))
    return total


def generate(model, prompts: torch.Tensor, new_tokens: int):
    """Greedy decoding with a static cache: transformers compiles the decode step itself, with the
    model's ``generation_config.compile_config`` (the prefill runs eagerly on both sides)."""
    return model.generate(
        prompts,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )


# what profiled() runs: kernel_table's 3 warm-up and 5 steps, host_table's 5, python_table's 5,
# host_phases' 3 warm-up and 30
PROFILED_STEPS = 51


def decode_step_ms(
    model, prompts: torch.Tensor, new_tokens: int, profile_label: str = "", warmup: int = 3, host_sync: bool = True
) -> tuple[float, torch.Tensor]:
    """Milliseconds per token of the compiled decode step alone: the forward ``generate`` compiles
    (same compile config), called in a plain loop that feeds back the greedy token, without
    ``generate``'s per-token Python around it. The gap to ``1/tokens_per_s`` is that Python.

    ``host_sync``: the position goes to the GPU from a Python int every token, a copy that waits
    for the previous token (as ``generate``'s loop also does): host time and GPU time add up.
    Otherwise the position stays on the GPU and is incremented there, as serving loops do: the
    host prepares token n+1 while the GPU runs token n, and the step costs the larger of the two.
    The static cache has room for the profiled steps too (recent transformers write at the cache's
    own running position, so none is decoded twice). Returns the time and the greedy tokens of
    the timed steps."""
    from transformers import StaticCache

    prompt_len = prompts.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + PROFILED_STEPS)
    step = model.get_compiled_call(model.generation_config.compile_config)
    steps = new_tokens - warmup
    position = prompt_len
    on_device = torch.tensor([prompt_len], device=prompts.device)
    # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns)
    cache_arg = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    with torch.no_grad():
        logits = model(prompts, **cache_arg, use_cache=True).logits  # eager prefill fills the cache
        token = logits[:, -1:].argmax(-1)

        def decode(count: int) -> torch.Tensor:
            nonlocal token, position, on_device
            for _ in range(count):
                cache_position = torch.tensor([position], device=prompts.device) if host_sync else on_device
                logits = step(token, **cache_arg, cache_position=cache_position, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
                decoded.append(token)
                position += 1
                if not host_sync:
                    on_device += 1
            return token

        decoded: list = []
        decode(warmup)  # compiles (or reuses generate's graph) and records the CUDA graph
        elapsed, _ = timing.timed(lambda: decode(steps))
        tokens = torch.cat(decoded, 1)
        if profile_label:
            profiled(lambda: decode(1), f"decode step, {profile_label}", 1e3 * elapsed / steps)
    return 1e3 * elapsed / steps, tokens


PROFILE_OUT: list = []  # the --profile file, once parsed


def profiled(step, label: str, step_ms: float) -> None:
    """Kernel and host tables of ``step`` appended to the ``--profile`` file: a device total well
    below the step's time means the GPU waits for the host."""
    text = "\n".join((profiling.kernel_table(step, label), f"{1e3 * step_ms:9.1f} us  step time", ""))
    host = (profiling.host_table(step, steps=5), profiling.python_table(step, steps=5), timing.host_phases(step, 30))
    write_profile(text + "\n" + "\n\n".join(host))


def write_profile(text: str) -> None:
    with open(PROFILE_OUT[0], "a") as f:
        f.write(text + "\n\n")


def compile_decode(model, backend: str) -> None:
    from transformers import CompileConfig

    # dynamic=False: each batch size and cache length gets its own static graph on both sides
    # (by default a second shape recompiles with symbolic shapes, and bitnet then keeps its opaque ops).
    model.generation_config.compile_config = CompileConfig(
        backend=backend, mode="reduce-overhead", fullgraph=True, dynamic=False
    )


def decode_side(model, label: str, args, rows: list, prompt_len: int, short: int, long: int) -> dict:
    """First-call wall time, tokens/s and decode-step time, peak memory and the results, per batch size."""
    out = {}
    for batch in args.batches:
        prompts = torch.randint(
            1,
            model.config.vocab_size,
            (batch, prompt_len),
            device=timing.DEVICE,
            generator=torch.Generator(timing.DEVICE).manual_seed(batch),
        )
        reset_peak()
        # What this side needs: its model's state plus the most allocated above what was allocated
        # when it began (the other side's model, which CUDA-graph trees keep alive, and the
        # reference twin excluded).
        start = torch.cuda.memory_allocated() if timing.CUDA else 0
        profiling.reset_compile_times()
        first, result = timing.timed(lambda: generate(model, prompts, short))
        if args.profile:
            write_profile(profiling.compile_table(f"generate, {label}, batch {batch}", first))
        t_short = min(timing.timed(lambda: generate(model, prompts, short))[0] for _ in range(args.repeat))
        t_long, result = min(
            (timing.timed(lambda: generate(model, prompts, long)) for _ in range(args.repeat)), key=lambda r: r[0]
        )
        tokens_per_s = batch * (long - short) / (t_long - t_short)
        if args.profile:  # where generate's host time goes beyond the compiled step's
            host = profiling.python_table(lambda: generate(model, prompts, long), 1, 30, "generate call")
            write_profile(f"== generate, {label}, batch {batch}: {long} new tokens, one call\n{host}")
        step_ms, tokens = decode_step_ms(model, prompts, long, f"{label}, batch {batch}" if args.profile else "")
        async_ms, same = decode_step_ms(model, prompts, long, host_sync=False)
        peak = peak_gib() - start / 2**30 + state_bytes(model) / 2**30
        emit(
            rows,
            args,
            part="decode",
            side=label,
            batch=batch,
            tokens_per_s=round(tokens_per_s, 1),
            step_ms=round(step_ms, 3),
            step_ms_no_sync=round(async_ms, 3),
            loops_agree=torch.equal(tokens, same),  # the two loops decode the same tokens
            first_generate_s=round(first, 1),
            peak_gib=round(peak, 2),
        )
        out[batch] = dict(
            tokens_per_s=tokens_per_s, step_ms=step_ms, async_ms=async_ms, first=first, peak=peak, result=result
        )
    return out


def bench_decode_and_prefill(args, rows: list) -> None:
    shapes = SMOKE if args.smoke else LLAMA3_8B
    layers = 2 if args.smoke else args.layers
    prompt_len, short, long = (8, 2, 6) if args.smoke else (16, 16, 80)
    torch.manual_seed(0)
    model = llama(layers, shapes)
    float_bytes = quantized_bytes(model)
    parts = set(args.part)

    compile_decode(model, "inductor")
    bf16 = {}
    if "decode" in parts:
        bf16 = decode_side(model, "bf16 Inductor", args, rows, prompt_len, short, long)
        # The same check against the same model run eagerly: the noise compiling alone brings.
        for batch in args.batches:
            bf16[batch]["error"] = check_logits(model, bf16[batch]["result"], prompt_len, "bf16 Inductor", args, rows)
    if "prefill" in parts:
        prefill(model, "bf16 Inductor", "inductor", args, rows)
    torch._dynamo.reset()

    # The reference twin's logits over the tokens bitnet decodes (eager, same latent weights).
    twin = reference_model(model).eval() if "decode" in parts else None
    deployed = bitcompile.deploy(copy.deepcopy(model))
    del model
    reset_peak()
    compile_decode(deployed, "bitnet")
    if "decode" in parts:
        bitnet = decode_side(deployed, "bitnet (deployed)", args, rows, prompt_len, short, long)
        emit_ratios(rows, args, "ratio", bf16, bitnet)
        emit(
            rows,
            args,
            part="memory",
            quantized_layers_bf16_gib=round(float_bytes / 2**30, 3),
            quantized_layers_bitnet_gib=round(quantized_bytes(deployed) / 2**30, 3),
            fraction=round(quantized_bytes(deployed) / float_bytes, 4),
        )
        for batch in args.batches:  # each batch size runs its own kernels (GEMV, tensor-core GEMM)
            noise = bf16.get(batch, {}).get("error")
            check_logits(twin, bitnet[batch]["result"], prompt_len, "bitnet (deployed)", args, rows, noise)
    if "prefill" in parts:
        prefill(deployed, "bitnet (deployed)", "bitnet", args, rows)
    label = "bitnet (deployed)"
    if args.int8_head:
        label = int8_head_side(deployed, twin, bf16, args, rows, prompt_len, short, long)
    for name, env in args.variants:
        with mock.patch.dict(os.environ, env):
            variant_side(deployed, twin, bf16, f"{label[:-1]}, {name})", args, rows, prompt_len, short, long)
    del twin, deployed
    torch._dynamo.reset()
    reset_peak()


def emit_ratios(rows: list, args, label: str, bf16: dict, bitnet: dict) -> None:
    """One ``decode`` row per batch size: bitnet's speed-ups over bf16 and both sides' peaks."""
    for batch in args.batches:
        emit(
            rows,
            args,
            part="decode",
            side=label,
            batch=batch,
            speedup=round(bitnet[batch]["tokens_per_s"] / bf16[batch]["tokens_per_s"], 2),
            step_speedup=round(bf16[batch]["step_ms"] / bitnet[batch]["step_ms"], 2),
            step_speedup_no_sync=round(bf16[batch]["async_ms"] / bitnet[batch]["async_ms"], 2),
            first_call_ratio=round(bitnet[batch]["first"] / bf16[batch]["first"], 2),
            peak_gib_bf16=round(bf16[batch]["peak"], 2),
            peak_gib_bitnet=round(bitnet[batch]["peak"], 2),
        )


def int8_head_side(deployed, twin, bf16: dict, args, rows: list, prompt_len: int, short: int, long: int) -> str:
    """The deployed model again with its ``lm_head`` in int8 (``deploy(excluded_weights="int8")``,
    weight-only, in place), against the bf16 rows above; its logits against the twin's with the
    same int8 head (so the check holds the compiled model to its own numerics). Returns its label."""
    bitcompile.deploy(deployed, excluded_weights="int8")
    if twin is not None:
        bitcompile.deploy(twin.model, excluded_weights="int8")  # the twin's other linears are its own layers
    label = "bitnet (deployed, int8 lm_head)"
    variant_side(deployed, twin, bf16, label, args, rows, prompt_len, short, long)
    return label


def variant_side(deployed, twin, bf16: dict, label: str, args, rows: list, prompt_len: int, short: int, long: int):
    """``deployed`` compiled afresh (the environment as the caller set it: ``--variants``), its
    decode and prefill rows against the bf16 rows above and its logits against ``twin``'s."""
    torch._dynamo.reset()
    compile_decode(deployed, "bitnet")
    if "decode" in args.part:
        side = decode_side(deployed, label, args, rows, prompt_len, short, long)
        emit_ratios(rows, args, "ratio, " + label.removeprefix("bitnet (deployed, ").rstrip(")"), bf16, side)
        for batch in args.batches:
            check_logits(twin, side[batch]["result"], prompt_len, label, args, rows, bf16[batch].get("error"))
    if "prefill" in args.part:
        prefill(deployed, label, "bitnet", args, rows)


def check_logits(reference, result, prompt_len: int, label: str, args, rows: list, noise=None) -> float:
    """Each decode step's logits against ``reference``'s over the same tokens (one eager forward);
    returns the largest step error (relative to the largest logit). ``noise``: the bf16 model's
    own compiled-against-eager error at this batch; the tolerance is ``LOGIT_TOLERANCE`` times it."""
    sequence = result.sequences
    with torch.no_grad():
        want = reference(sequence[:, :-1]).logits[:, prompt_len - 1 :].float()
    got = torch.stack(result.logits, dim=1).float()
    want, got = want[:, :32], got[:, :32]  # the first 32 decode steps
    scale = want.abs().amax()
    step_error = ((got - want).abs().amax(dim=(0, 2)) / scale).tolist()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    limit = None if noise is None else LOGIT_TOLERANCE * noise
    checked = {} if limit is None else dict(tolerance=round(limit, 5), within=max(step_error) <= limit)
    emit(
        rows,
        args,
        part="decode logits",
        side=label,
        batch=sequence.shape[0],
        steps=len(step_error),
        max_rel_error=round(max(step_error), 5),
        mean_rel_error=round(sum(step_error) / len(step_error), 5),
        argmax_agreement=round(agree, 4),
        **checked,
    )
    return max(step_error)


def prefill(model, label: str, backend: str, args, rows: list) -> None:
    tokens = 64 if args.smoke else 2048
    x = torch.randint(1, model.config.vocab_size, (1, tokens), device=timing.DEVICE)
    forward = torch.compile(model, backend=backend, mode="reduce-overhead")
    keep = 1 if args.prefill_logits == "last" else 0  # transformers: 0 keeps every position

    def run():
        return forward(x, use_cache=False, logits_to_keep=keep).logits

    with torch.no_grad():
        profiling.reset_compile_times()
        first, _ = timing.timed(run)
        if args.profile:
            write_profile(profiling.compile_table(f"prefill, {label}", first))
        times = sorted(timing.timed(run)[0] for _ in range(max(args.repeat, 5)))
        if args.profile:
            profiled(run, f"prefill, {label}", 1e3 * times[len(times) // 2])
    emit(
        rows,
        args,
        part="prefill",
        side=label,
        tokens=tokens,
        logits=args.prefill_logits,
        ms=round(1e3 * times[len(times) // 2], 2),
        first_call_s=round(first, 1),
    )


def bench_layers(args, rows: list) -> None:
    """A stack of independent linears, each its own input, compiled with CUDA graphs."""
    cases = [(1, 8192, 8), (16, 4096, 32), (16, 8192, 8), (128, 4096, 32), (128, 8192, 8), (8192, 8192, 4)]
    if args.smoke:
        cases = [(1, 64, 2), (16, 64, 2)]

    class Stack(nn.Module):
        def __init__(self, d, n):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))

        def forward(self, xs):
            return [layer(x) for layer, x in zip(self.layers, xs)]

    for m, d, n in cases:
        per_layer = stack_us(Stack, m, d, n, args.variants)
        peer = per_layer.get("gemlite A8W158")
        bf16 = per_layer["bf16 Inductor"]
        emit(
            rows,
            args,
            part="layers",
            m=m,
            n=d,
            k=d,
            layers=n,
            bf16_us=round(bf16, 2),
            bitnet_us=round(per_layer["bitnet"], 2),
            speedup=round(bf16 / per_layer["bitnet"], 2),
            **{f"bitnet_{name}_us": round(per_layer[f"bitnet, {name}"], 2) for name, _ in args.variants},
            **{f"speedup_{name}": round(bf16 / per_layer[f"bitnet, {name}"], 2) for name, _ in args.variants},
            gemlite_us=round(peer, 2) if isinstance(peer, float) else peer,
        )
        reset_peak()


def stack_us(stack: type, m: int, d: int, n: int, variants=()) -> dict:
    """Per-layer time of ``stack(d, n)`` on ``m`` rows, each side compiled with CUDA graphs (the
    gemlite side: a float, or why it did not run); bitnet again under each of ``variants``'
    environments (``--variants``)."""
    model = stack(d, n).to(timing.DEVICE, torch.bfloat16).eval()
    xs = [torch.randn(m, d, device=timing.DEVICE, dtype=torch.bfloat16) for _ in range(n)]

    def bitnet():
        return torch.compile(model, backend="bitnet", options={"mode": "reduce-overhead", "exclude": []})

    sides = [
        ("bf16 Inductor", {}, lambda: torch.compile(model, mode="reduce-overhead")),
        ("bitnet", {}, bitnet),
        *((f"bitnet, {name}", env, bitnet) for name, env in variants),
        ("gemlite A8W158", {}, lambda: torch.compile(gemlite_stack(model), mode="reduce-overhead")),
    ]
    per_layer = {}
    for label, env, build in sides:
        try:
            with mock.patch.dict(os.environ, env), torch.no_grad():
                compiled = build()
                for _ in range(3):
                    compiled(xs)
                per_layer[label] = timing.wall_us(lambda: compiled(xs), calls=20) / n
        except Exception as e:  # the peer only: an optional package, its own failures reported
            if label != "gemlite A8W158":
                raise
            per_layer[label] = f"not run: {type(e).__name__}: {str(e)[:120]}"
        torch._dynamo.reset()
    return per_layer


def gemlite_stack(model: nn.Module) -> nn.Module:
    """``model``'s linears as gemlite A8W158 layers over the same ternary weights (per-tensor
    absmean scale, the BitNet b1.58 quantizer), each called on its own input as in ``model``."""
    from gemlite.helper import A8W158_INT_dynamic

    def ternary(linear: nn.Linear) -> nn.Module:
        w = linear.weight.detach().float()
        scale = w.abs().mean().clamp(min=1e-5)
        trits = (w / scale).round().clamp(-1, 1).to(linear.weight.dtype)
        return A8W158_INT_dynamic(device=str(w.device)).from_weights(trits, scale)

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(ternary(layer) for layer in model.layers)

        def forward(self, xs):
            return [layer(x) for layer, x in zip(self.layers, xs)]

    return Peer()


class FakeQuantLinear(nn.Linear):
    """The usual eager BitLinear formula (absmean ternary weights, absmax int8 activations, STE by
    detach), as people write it, compiled by Inductor."""

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
        xq = x + ((x / s).round().clamp(-128, 127) * s - x).detach()
        w = self.weight
        sw = w.abs().mean().clamp(min=1e-5)
        wq = w + ((w / sw).round().clamp(-1, 1) * sw - w).detach()
        return F.linear(xq, wq, self.bias)


def fake_quant(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "lm_head":
                fq = FakeQuantLinear(child.in_features, child.out_features, child.bias is not None, device="meta")
                fq.weight, fq.bias = child.weight, child.bias
                setattr(module, child_name, fq)
    return model


def bench_qat(args, rows: list) -> None:
    sizes = [64] if args.smoke else args.qat_sizes
    tokens = 256 if args.smoke else 8192
    seq = 128 if args.smoke else 2048
    variants = ("Inductor", "fake-quant", "bitnet", "bitnet q8") + (
        ("bitnet grouped",) if args.group_weight_pack else ()
    )
    for size in sizes:
        shapes = dict(SMOKE, num_hidden_layers=2) if args.smoke else QAT_SIZES[size]
        for recipe in args.recipes:
            result = {}
            for variant in variants:
                if variant in ("fake-quant", "bitnet q8") and not args.smoke and recipe not in args.full_recipes:
                    continue
                label = f"QAT step, hidden {size}, {recipe}, {variant}" if args.profile else ""
                grouped = "1" if variant == "bitnet grouped" else os.environ.get("BITCOMPILE_GROUP_WEIGHT_PACK", "0")
                with mock.patch.dict(os.environ, {"BITCOMPILE_GROUP_WEIGHT_PACK": grouped}):
                    ms, first, peak = qat_step(shapes, recipe, variant, tokens, seq, args.repeat, label, args.qat_mode)
                result[variant] = ms
                emit(
                    rows,
                    args,
                    part="qat",
                    hidden=size,
                    recipe=recipe,
                    variant=variant,
                    mode=args.qat_mode or "default",
                    step_ms=round(ms, 2),
                    first_step_s=round(first, 1),
                    peak_gib=round(peak, 2),
                    vs_inductor=round(result["Inductor"] / ms, 3) if "Inductor" in result else None,
                )
                torch._dynamo.reset()
                reset_peak()


def qat_step(
    shapes: dict, recipe: str, variant: str, tokens: int, seq: int, repeat: int, profile_label="", mode=None
) -> tuple:
    """``(step ms, first step s, peak GiB)`` of one model, recipe and variant, every side
    compiled with Inductor's ``mode`` (``"reduce-overhead"``: forward and backward in CUDA graphs)."""
    torch.manual_seed(0)
    param_dtype = torch.bfloat16 if recipe == "bf16" else torch.float32
    dims = {k: v for k, v in shapes.items() if k != "num_hidden_layers"}
    model = llama(shapes["num_hidden_layers"], dims, param_dtype).train()
    if variant == "fake-quant":
        fake_quant(model)
    if variant.startswith("bitnet"):
        options = {"grad_input_bits": 8} if variant == "bitnet q8" else {}
        bitcompile.compile(model, **options, **({"mode": mode} if mode else {}))
    else:
        model.compile(mode=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=timing.CUDA)
    ids = torch.randint(1, model.config.vocab_size, (tokens // seq, seq), device=timing.DEVICE)
    autocast = torch.autocast(timing.DEVICE, dtype=torch.bfloat16) if recipe == "fp32+autocast" else None

    def step():
        with autocast or contextlib.nullcontext():
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    profiling.reset_compile_times()
    first, _ = timing.timed(step)
    if profile_label:
        write_profile(profiling.compile_table(profile_label, first))
    for _ in range(2):
        step()
    # Runs of consecutive steps, as a training loop that does not wait for each loss: the host
    # queues step n+1 while the GPU runs step n (a host-bound step shows it). Median of the runs.
    times = sorted(timing.timed(lambda: [step() for _ in range(STEPS_PER_RUN)])[0] for _ in range(repeat + 2))
    ms = 1e3 * times[len(times) // 2] / STEPS_PER_RUN
    if profile_label:
        profiled(step, profile_label, ms)
    return ms, first, peak_gib()


def markdown(rows: list) -> str:
    lines = [
        f"# Model benchmark ({timing.device_name()}, torch {torch.__version__})",
        "",
        "Generated by `python benchmarks/bench_models.py`; notes belong in BENCHMARKS.md.",
        "",
    ]
    for part in ("decode", "decode logits", "memory", "prefill", "layers", "qat"):
        part_rows = [r for r in rows if r["part"] == part]
        if not part_rows:
            continue
        keys = [k for k in part_rows[0] if k != "part"]
        for r in part_rows[1:]:
            keys += [k for k in r if k not in keys and k != "part"]
        lines += [f"## {part}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in part_rows]
        lines.append("")
    return "\n".join(lines)


def variants(spec: str) -> list[tuple[str, dict]]:
    """``"a:X=1;Y=2,b:Z=1"`` -> ``[("a", {"X": "1", "Y": "2"}), ("b", {"Z": "1"})]``."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, assignments = item.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(";") if "=" in a)
        if not name or not env:
            raise argparse.ArgumentTypeError(f"a variant is NAME:VAR=VALUE[;VAR=VALUE], got {item!r}")
        out.append((name, env))
    return out


def drop_passes(names: list) -> None:
    from bitcompile.passes import manager

    known = [p.name for p in manager.PASSES]
    if unknown := sorted(set(names) - set(known)):
        raise SystemExit(f"--without-passes: unknown pass(es) {unknown}; the passes are {known}")
    manager.PASSES = tuple(p for p in manager.PASSES if p.name not in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="decode,prefill,layers,qat", type=lambda s: s.split(","))
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the Llama-3-8B-shaped model")
    parser.add_argument(
        "--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8], help="decode batch sizes"
    )
    parser.add_argument("--qat-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[384, 2048, 4096])
    parser.add_argument("--recipes", type=lambda s: s.split(","), default=list(RECIPES))
    parser.add_argument(
        "--full-recipes",
        type=lambda s: s.split(","),
        default=["bf16"],
        help="recipes that also run fake-quant and grad_input_bits=8",
    )
    parser.add_argument(
        "--group-weight-pack",
        action="store_true",
        help="also QAT with each graph's weights packed in one grouped call (BITCOMPILE_GROUP_WEIGHT_PACK=1)",
    )
    parser.add_argument(
        "--qat-mode", default=None, help='Inductor mode of every QAT side ("reduce-overhead": CUDA graphs)'
    )
    parser.add_argument("--prefill-logits", choices=("last", "all"), default="last")
    parser.add_argument(
        "--int8-head", action="store_true", help="also decode and prefill with lm_head in int8 (weight-only)"
    )
    parser.add_argument(
        "--without-passes",
        type=lambda s: s.split(","),
        default=[],
        help="run bitnet without these compiler passes (names in bitcompile.passes.PASSES), to measure one",
    )
    parser.add_argument(
        "--variants",
        type=variants,
        default=[],
        help="also decode and prefill the deployed model compiled under these environments, each"
        ' "NAME:VAR=VALUE[;VAR=VALUE]" (e.g. swiglu:BITCOMPILE_SWIGLU=1), after the default (and int8 head) sides',
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/models.md")
    parser.add_argument("--jsonl", default=None, help="also append each row here as it is measured")
    parser.add_argument("--profile", default=None, help="append each decode and QAT step's kernel and host tables here")
    args = timing.parse_args(parser)
    if args.profile:
        PROFILE_OUT.append(args.profile)
    drop_passes(args.without_passes)
    rows: list = []
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 recipes: fp32 GEMMs on both sides
    if {"decode", "prefill"} & set(args.part):
        bench_decode_and_prefill(args, rows)
    if "layers" in args.part:
        bench_layers(args, rows)
    if "qat" in args.part:
        bench_qat(args, rows)
    with open(args.out, "w") as f:
        f.write(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
