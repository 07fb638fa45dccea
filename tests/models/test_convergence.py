"""QAT through the backend under mixed precision learns as well as float training: a byte-level
language model on text that ships with Python, a few hundred steps, validation loss within 10%
of the same model trained without quantization under the same recipe."""

import inspect
import json

import pytest
import torch

import bitcompile

# (steps, batch, sequence, hidden, layers): the CPU suite's size, and the GPU's
CPU_RUN = (200, 8, 32, 64, 2)
GPU_RUN = (400, 32, 128, 256, 4)


def corpus(modules=(json.decoder, json.encoder, inspect), limit: int = 60_000) -> torch.Tensor:
    """Bytes of standard-library sources: real text, no download."""
    text = "".join(inspect.getsource(m) for m in modules)
    return torch.tensor(list(text.encode()[:limit]), dtype=torch.long)


def train(quantized: bool, data: torch.Tensor, run=CPU_RUN, device: str = "cpu") -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    steps, batch, seq, hidden, layers = run
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)  # fmt: skip
    model = LlamaForCausalLM(config).to(device)  # fp32 parameters, bf16 autocast: standard mixed precision
    if quantized:
        bitcompile.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    split = int(0.9 * len(data))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, split - seq - 1, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = data[split:]
    ids = torch.stack([val[s : s + seq] for s in range(0, len(val) - seq, seq)][:64]).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        return model(ids, labels=ids).loss.item()


def check(float_loss: float, qat_loss: float) -> None:
    assert qat_loss < 0.75 * torch.log(torch.tensor(256.0)).item()  # it learned: well below uniform
    assert qat_loss <= 1.10 * float_loss, (qat_loss, float_loss)


@pytest.mark.slow
def test_mixed_precision_qat_reaches_the_float_models_validation_loss():
    data = corpus()
    check(train(False, data), train(True, data))


@pytest.mark.gpu
def test_mixed_precision_qat_reaches_the_float_models_validation_loss_on_cuda():
    """The same at a larger size on the GPU (the quantized model's kernels, not the reference):
    a 4-layer, 256-wide model, 400 steps of 32 x 128 bytes, on ~300 KB of sources."""
    import ast
    import dataclasses
    import typing

    data = corpus((json.decoder, json.encoder, inspect, ast, dataclasses, typing), limit=300_000)
    check(train(False, data, GPU_RUN, "cuda"), train(True, data, GPU_RUN, "cuda"))
