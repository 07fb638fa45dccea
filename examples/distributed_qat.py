"""Distributed quantization-aware training of a ternary Llama with DDP or FSDP2.

A tiny transformers Llama (built from a config, no download) learns the characters of the Zen of
Python (Python's `this` module) on every process; training the bitnet-compiled model is QAT.

    torchrun --nproc_per_node=2 examples/distributed_qat.py [--mode ddp|fsdp2] [--steps 40]

gloo on the CPU, nccl with one GPU per process. `--mode ddp` wraps the model in
DistributedDataParallel and compiles the wrapper; `--mode fsdp2` shards each decoder layer and the
root with `fully_shard` and compiles the model. Rank 0 prints the loss (averaged over the
processes), an eval loss on packed weights, and the backend's report. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bitcompile


def zen_tokens() -> tuple[torch.Tensor, int]:
    """The Zen of Python as character ids (stdlib: importing `this` prints it, so it is silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    chars = sorted(set(text))
    return torch.tensor([chars.index(c) for c in text]), len(chars)


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=max(vocab, 64),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(tokens: torch.Tensor, batch: int, seq: int, rank: int, seed: int):
    """Random windows of the text, different on each rank (each rank's data shard)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    while True:
        start = torch.randint(0, len(tokens) - seq, (batch,), generator=g)
        yield torch.stack([tokens[s : s + seq] for s in start.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # env:// rendezvous, as torchrun sets it up
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    tokens, vocab = zen_tokens()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = tiny_llama(vocab).to(device)
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        compiled = bitcompile.compile(DistributedDataParallel(model, device_ids=[device.index] if cuda else None))
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)  # each decoder layer: its own all-gather / reduce-scatter
        fully_shard(model)
        compiled = bitcompile.compile(model)
    # Created before the first forward: the optimizer must hold the sharded parameters (FSDP2).
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    data = batches(tokens, args.batch, args.seq, rank, seed=0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next(data).to(device)
        loss = lm_loss(compiled(input_ids=ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the loss each rank saw, averaged (the gradients already are)
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {mean.item() / world:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)

    # Eval: under no_grad the compiled model runs packed 2-bit weights and int8 activations.
    model.eval()
    held_out = next(batches(tokens, args.batch, args.seq, rank, seed=1)).to(device)
    with torch.no_grad():
        eval_loss = lm_loss(compiled(input_ids=held_out).logits, held_out)
    dist.all_reduce(eval_loss)
    if rank == 0:
        print(f"eval loss (packed weights) {eval_loss.item() / world:.4f}")
        print(bitcompile.report_of(compiled))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
