"""Quantization-aware training of a small Llama with transformers' Trainer, then export to
transformers' BitNet format.

The corpus is Python's own standard library source (shipped with every Python), tokenized as
bytes. The same model is trained twice, same steps and data: once compiled with
`bitcompile.compile(model)` (ternary weights, int8 activations: QAT) and once in float without
quantization. Both are evaluated by perplexity on held-out text; the QAT model is exported with
`bitcompile.export_transformers`, reloaded with transformers' own
`AutoModelForCausalLM.from_pretrained` (its BitLinear layers) and asked for a short sample.

    python examples/llm_qat.py                       # 1.1M-parameter Llama, 100 steps: a few minutes on a CPU
    python examples/llm_qat.py --tiny --steps 2      # smoke run
    python examples/llm_qat.py --model DIR           # fine-tune a local checkpoint (float or BitNet) instead
"""

import argparse
import copy
import math
import os
import sys
import sysconfig
import time

import torch

import bitcompile

STDLIB_FILES = [
    "textwrap.py",
    "string.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "difflib.py",
    "heapq.py",
    "bisect.py",
    "colorsys.py",
    "queue.py",
    "sched.py",
    "calendar.py",
    "argparse.py",
    "dataclasses.py",
]


def corpus() -> bytes:
    """Source files of the standard library, joined."""
    root = sysconfig.get_paths()["stdlib"]
    parts = [
        open(os.path.join(root, name), "rb").read() for name in STDLIB_FILES if os.path.exists(os.path.join(root, name))
    ]
    if not parts:
        sys.exit(f"no standard library sources found under {root}")
    return b"\n\n".join(parts)


class Bytes:
    """Byte-level tokenizer: token i is byte i (vocabulary 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class Pretrained:
    """A local checkpoint's own tokenizer, with the same two methods."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def chunks(ids: torch.Tensor, length: int) -> list[dict]:
    """Non-overlapping ``length``-token examples (labels = inputs: the model shifts them)."""
    n = len(ids) // length
    return [{"input_ids": row, "labels": row} for row in ids[: n * length].view(n, length)]


def new_model(args, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    else:
        size = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **size,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load_model(directory: str):
    """A local checkpoint: transformers' BitNet format through bitcompile, else from_pretrained."""
    import json

    from transformers import AutoModelForCausalLM

    with open(os.path.join(directory, "config.json")) as f:
        quantized = json.load(f).get("quantization_config", {}).get("quant_method") == "bitnet"
    if quantized:
        return bitcompile.load_transformers(directory)
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)


def train(model, data, args, label: str) -> float:
    """Trainer over ``data`` for ``args.steps`` steps; returns the seconds it took."""
    from transformers import Trainer, TrainingArguments

    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer", label),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        dataloader_pin_memory=False,
    )
    start = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=data).train()
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model, data, batch: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids = torch.stack([row["input_ids"] for row in data[i : i + batch]]).to(device)
        total += float(model(ids, labels=ids).loss) * len(ids)
        count += len(ids)
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps of each model (default 100)")
    parser.add_argument("--model", metavar="DIR", help="a local checkpoint to fine-tune instead of the config model")
    parser.add_argument(
        "--out", metavar="DIR", default="llm_qat_out", help="where the export goes (default llm_qat_out)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny config, short sequences: a smoke run")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 64; 32 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="examples per step (default 8; 4 with --tiny)")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    args.seq_len = args.seq_len or (32 if args.tiny else 64)
    args.batch = args.batch or (4 if args.tiny else 8)
    device = torch.device(args.device)

    tokenizer = Pretrained(args.model) if args.model else Bytes()
    ids = torch.tensor(tokenizer.encode(corpus().decode("utf-8", errors="replace")))
    split = int(0.9 * len(ids))
    train_data, eval_data = chunks(ids[:split], args.seq_len), chunks(ids[split:], args.seq_len)
    eval_data = eval_data[: 16 if args.tiny else 128]
    print(
        f"corpus: {len(ids):,} tokens of standard-library source ({len(train_data)} training examples of "
        f"{args.seq_len}, {len(eval_data)} held out)"
    )

    qat = load_model(args.model) if args.model else new_model(args, tokenizer.vocab_size)
    qat.config.use_cache = False
    baseline = copy.deepcopy(qat)  # same weights, trained without quantization
    params = sum(p.numel() for p in qat.parameters())
    print(
        f"model: {type(qat).__name__}, {params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch} x "
        f"{args.seq_len} tokens on {device}"
    )

    qat_seconds = train(bitcompile.compile(qat), train_data, args, "bitnet")
    float_seconds = train(baseline, train_data, args, "float")
    qat_ppl = perplexity(qat, eval_data, args.batch, device)  # compiled eval: packed 2-bit weights, int8 activations
    float_ppl = perplexity(baseline, eval_data, args.batch, device)

    from transformers import AutoModelForCausalLM

    export_dir = os.path.join(args.out, "bitnet")
    bitcompile.export_transformers(qat, export_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(export_dir).to(device)  # transformers' own BitLinear layers
    reloaded_ppl = perplexity(reloaded, eval_data, args.batch, device)
    prompt = "def "
    prompt_ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    with torch.no_grad():
        # Up to the trained context length (the config's max_position_embeddings).
        out = reloaded.generate(
            prompt_ids,
            max_new_tokens=max(1, args.seq_len - prompt_ids.shape[1]),
            do_sample=True,
            top_k=10,
            temperature=0.8,
            pad_token_id=0,
        )
    sample = prompt + tokenizer.decode(out[0, prompt_ids.shape[1] :].tolist())

    weights = os.path.getsize(os.path.join(export_dir, "model.safetensors"))
    print()
    print(f"{'model':<44}{'train s':>9}{'eval perplexity':>17}")
    print(f"{'float (fp32, no quantization)':<44}{float_seconds:>9.1f}{float_ppl:>17.2f}")
    print(f"{'bitnet QAT (bitcompile.compile)':<44}{qat_seconds:>9.1f}{qat_ppl:>17.2f}")
    print(f"{'exported, from_pretrained (BitLinear)':<44}{'':>9}{reloaded_ppl:>17.2f}")
    print(
        f"\nexport: {export_dir} ({weights / 1024:.0f} KiB of safetensors; float weights {params * 4 / 1024:.0f} KiB)"
    )
    print(f"sample: {sample!r}")


if __name__ == "__main__":
    main()
