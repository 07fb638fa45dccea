"""QAT through the backend under mixed precision learns as well as float training: a byte-level
language model on text that ships with Python, a few hundred steps, validation loss within 10%
of the same model trained without quantization under the same recipe."""

import inspect
import json

import pytest
import torch

import bitcompile

STEPS, BATCH, SEQ = 200, 8, 32


def corpus() -> torch.Tensor:
    """Bytes of a few standard-library sources: real text, no download."""
    text = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, inspect))
    return torch.tensor(list(text.encode()[:60_000]), dtype=torch.long)


def train(quantized: bool, data: torch.Tensor) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)  # fmt: skip
    model = LlamaForCausalLM(config)  # fp32 parameters, bf16 autocast: standard mixed precision
    if quantized:
        bitcompile.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    split = int(0.9 * len(data))
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        starts = torch.randint(0, split - SEQ - 1, (BATCH,), generator=generator)
        ids = torch.stack([data[s : s + SEQ] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = data[split:]
    ids = torch.stack([val[s : s + SEQ] for s in range(0, len(val) - SEQ, SEQ)][:64])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(ids, labels=ids).loss.item()


@pytest.mark.slow
def test_mixed_precision_qat_reaches_the_float_models_validation_loss():
    data = corpus()
    float_loss, qat_loss = train(False, data), train(True, data)
    assert qat_loss < 0.75 * torch.log(torch.tensor(256.0)).item()  # it learned: well below uniform
    assert qat_loss <= 1.10 * float_loss, (qat_loss, float_loss)
