"""Tune the kernels for the linear shapes of common open models, so that a first run on this GPU
finds them in the table instead of estimating them from the nearest tabled shape.

    python benchmarks/tune_models.py [--models llama3-8b,qwen2.5-7b] [--rows 1,8,16,128,2048]
                                     [--qat] [--int8-head] [--limit-s 500] [--smoke]

For each model's projections (q/o, GQA k/v, the sibling-fused q+k+v and gate+up, gate/up, down)
at each row count: the inference matmul as a compiled model launches it (Inductor-traced) and as
an eager call does; with ``--qat``, at 8192 rows and for the unfused projections (training graphs
keep siblings apart), the training step's kernels (the forward matmul, the input gradient from
bf16 output gradients, the weight packer from bf16 and fp32 weights); with ``--int8-head``, an
int8 lm_head (``deploy(excluded_weights="int8")``) at decode rows. The models: common open
ones, and ``bench-qat-*``, the QAT models of ``bench_models.py``. Every timing lands in
the user's tuning cache (``bitcompile.kernels.tuning``), keys already there are skipped, and
``--limit-s`` stops between shapes: rerun to resume. ``--ship CACHE_JSON`` merges such a cache
file into the shipped H100 table (``bitcompile/kernels/tuned/``). ``--smoke``: a tiny model in the
Triton interpreter (no timing): checks the script.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import timing
from model_shapes import OPEN_MODEL_HEADS, OPEN_MODELS, QAT_SIZES

# (hidden, intermediate, attention heads, key/value heads): the open models and the model benchmark's
# QAT models (bench-qat-<hidden>; the 2048 one is not TinyLlama: 16 heads, not 32)
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
MODELS = OPEN_MODELS | {f"bench-qat-{size}": tuple(c[key] for key in CONFIG_KEYS) for size, c in QAT_SIZES.items()}
SMOKE_MODELS = {"tiny-gqa": (64, 96, 4, 2)}
SMOKE_HEADS = {"tiny-gqa": 256}
INFERENCE_ROWS = (1, 8, 16, 128, 2048)  # decode batches, a 128-token chunk, a 2048-token prefill
HEAD_ROWS = (1, 8, 16)  # an int8 lm_head's rows: decode batches (prefill keeps the last position's logits)
QAT_ROWS = 8192


def projections(hidden: int, intermediate: int, heads: int, kv_heads: int, fused: bool = True) -> dict:
    """``{name: (N, K)}`` of a Llama-style decoder layer's linears; ``fused``: the sibling-fused
    ones too (inference graphs fuse them; training graphs keep the linears apart)."""
    kv = kv_heads * (hidden // heads)
    shapes = {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (intermediate, hidden)}
    if fused:
        shapes |= {"q+k+v": (hidden + 2 * kv, hidden), "gate+up": (2 * intermediate, hidden)}
    return shapes | {"down": (hidden, intermediate)}


def shapes(models: list[str], table: dict, fused: bool = True) -> list[tuple[int, int]]:
    """The distinct ``(N, K)`` of ``models``, in the order given."""
    seen: dict[tuple[int, int], None] = {}
    for name in models:
        for nk in projections(*table[name], fused=fused).values():
            seen.setdefault(nk)
    return list(seen)


def tune_inference(m: int, n: int, k: int) -> None:
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=timing.DEVICE)
    # codes 0 and 1 in every 2-bit field: trits -1 and 0 (valid packed weights; timing ignores values)
    wq = torch.randint(0, 256, (n, (k + 3) // 4), dtype=torch.uint8, device=timing.DEVICE) & 0x55
    xs = torch.rand(m, 1, device=timing.DEVICE)
    ws = torch.rand(1, device=timing.DEVICE)
    for wrap in (None, lambda f: f):  # eager launch, then as Inductor's traced launch chooses
        ternary_matmul(a, wq, k, xs, ws, None, torch.bfloat16, wrap=wrap)


def tune_int8_head(m: int, n: int, k: int) -> None:
    from bitcompile.kernels.int8_weight_matmul import int8_weight_matmul

    x = torch.randn(m, k, device=timing.DEVICE, dtype=torch.bfloat16 if timing.CUDA else torch.float32)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=timing.DEVICE)
    int8_weight_matmul(x, w, torch.rand(n, device=timing.DEVICE))


def tune_training(m: int, n: int, k: int) -> None:
    import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
    from bitcompile.kernels.weight_pack import quantize_pack

    tune_inference(m, n, k)  # the step's forward matmul
    for dtype in (torch.bfloat16, torch.float32):  # the bf16 and the fp32-master-weight recipes
        wq, ws = quantize_pack(torch.randn(n, k, device=timing.DEVICE, dtype=dtype))
    grad = torch.randn(m, n, device=timing.DEVICE, dtype=torch.bfloat16)
    torch.ops.bitnet.grad_input(grad, wq, ws, k, None)  # the exact STE's input gradient


def ship(cache: str) -> None:
    from bitcompile.kernels import tuning

    table = tuning.SHIPPED_DIR / f"{tuning.ARCH_TABLES[(9, 0)]}.json"
    shipped, tuned = json.loads(table.read_text()), json.loads(Path(cache).read_text())
    added = sum(key not in shipped for key in tuned)
    changed = sum(key in shipped and shipped[key] != cfg for key, cfg in tuned.items())
    shipped.update(tuned)
    table.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
    print(f"{table}: {added} entries added, {changed} changed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument(
        "--rows", type=lambda s: [int(v) for v in s.split(",") if v], default=list(INFERENCE_ROWS), help='"": none'
    )
    parser.add_argument("--qat", action="store_true", help=f"also the training kernels at {QAT_ROWS} rows")
    parser.add_argument("--int8-head", action="store_true", help=f"also an int8 lm_head at {HEAD_ROWS} rows")
    parser.add_argument("--limit-s", type=float, default=float("inf"), help="stop starting new shapes after this")
    parser.add_argument("--ship", metavar="CACHE_JSON", help="merge a tuning cache file into the shipped table, exit")
    shipping = parser.parse_known_args()[0].ship  # (needs no GPU)
    if shipping:
        return ship(shipping)
    args = timing.parse_args(parser)
    table = SMOKE_MODELS if args.smoke else MODELS
    if args.smoke:
        args.models, args.rows = list(SMOKE_MODELS), [1]
    unknown = [name for name in args.models if name not in table]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(table)}")
    os.environ["BITCOMPILE_AUTOTUNE"] = "1"
    work = [("inference", m, n, k) for n, k in shapes(args.models, table) for m in args.rows]
    if args.qat:
        rows = 64 if args.smoke else QAT_ROWS
        work += [("training", rows, n, k) for n, k in shapes(args.models, table, fused=False)]
    if args.int8_head:
        heads = SMOKE_HEADS if args.smoke else OPEN_MODEL_HEADS
        sizes = dict.fromkeys((heads[name], table[name][0]) for name in args.models if name in heads)
        work += [("int8 head", m, n, k) for n, k in sizes for m in HEAD_ROWS]
    start = time.monotonic()
    for i, (kind, m, n, k) in enumerate(work):
        if time.monotonic() - start > args.limit_s:
            print(f"stopped after {i} of {len(work)} shapes (--limit-s); rerun to resume", flush=True)
            return
        print(f"[{i + 1}/{len(work)}] {kind} M={m} N={n} K={k}", flush=True)
        {"inference": tune_inference, "training": tune_training, "int8 head": tune_int8_head}[kind](m, n, k)
        timing.sync()
    print(f"tuned {len(work)} shapes in {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
