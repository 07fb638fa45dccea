"""Kernel benchmark: one table, printed and written to benchmarks/results/kernels.md (what `make bench`
runs). The file is generated, rewritten on every run; BENCHMARKS.md, the written history, is never touched.

    python benchmarks/bench_kernels.py [--out FILE] [--quick | --smoke]

Timed as ``timing.time_rotating`` times: weight buffers rotated past the L2, so every call reads its
weights from HBM, and the calls replayed from a CUDA graph (launch overhead excluded, as in a decode loop
or a compiled graph); our matmul is also timed launched from Python each call ("eager launch"). A QAT
step is timed per step over runs of QAT_STEPS consecutive steps, launched from Python (or replayed, with
``mode="reduce-overhead"``): the host queues a step while the GPU runs the one before.

``--smoke`` runs every part at tiny shapes on whatever device there is (the CPU in CI,
with wall-clock timing): a check that the script runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
from bitcompile.backend import cpp_wrapper_patches

from qat_steps import qat_steps
from timing import (
    DEVICE,
    copies,
    copy_bandwidth,
    device_name,
    host_us,
    parse_args,
    read_floor_us,
    sync,
    tb_per_s,
    time_rotating,
)

ops = torch.ops.bitnet
OUT = Path(__file__).resolve().parent / "results" / "kernels.md"  # generated; BENCHMARKS.md is written by hand
FULL = dict(
    shapes=[(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)],
    ms=[1, 16, 128, 1024, 8192],
    qat=[(8192, 4096, 4096), (8192, 8192, 8192)],
    decode=(8192, 8192),
    copy_bytes=2**30,
    conv=[(32, 64, 64, 56, 3, 1), (32, 128, 256, 28, 3, 2), (32, 512, 512, 7, 3, 1), (32, 256, 64, 56, 1, 1)],
)
SMOKE = dict(
    shapes=[(64, 96)], ms=[1, 16, 40], qat=[(32, 64, 64)], decode=(64, 96), copy_bytes=2**20, conv=[(2, 8, 8, 6, 3, 1)]
)
TARGETS = {  # (M, N, K): minimum speed-up over bf16 cuBLAS (the project's performance targets)
    (1, 8192, 8192): 6.0,
    (1, 4096, 4096): 4.0,
    (16, 8192, 8192): 5.0,
    (128, 8192, 8192): 2.5,
    (8192, 8192, 8192): 1.3,
}
BW_TARGETS = {(1, 8192, 8192): 0.80}  # minimum share of the measured copy bandwidth on the packed bytes
FLOOR_TILES = [(chunk, block, 1) for chunk in (1024, 2048, 4096) for block in (256, 512)]  # read_floor's best (1 warp)


def bench_matmul(m: int, n: int, k: int):
    dev = DEVICE
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    r = copies(n * k * 2)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(r)]
    graph = True  # kernel time for every M; `ours_eager` below adds the Python launch path
    row = {}
    row["bf16"] = time_rotating([lambda w=w: F.linear(x, w) for w in ws], graph)
    if m > 16:
        xi = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
        wis = [torch.randint(-1, 2, (n, k), dtype=torch.int8, device=dev).t() for _ in range(copies(n * k))]
        row["int_mm"] = time_rotating([lambda w=w: torch._int_mm(xi, w) for w in wis], graph)
        del wis
    packed = [ops.quantize_weights(w, "ternary", False) for w in ws[:1]]
    rp = copies(n * k // 4)
    packed = [(packed[0][0].clone(), packed[0][1]) for _ in range(rp)]
    del ws
    xq, xs = ops.quantize_activations(x, 8)
    calls = [lambda p=p: ops.linear_q(xq, xs, p[0], p[1], None, k, torch.bfloat16, "none", None) for p in packed]
    row["ours"] = time_rotating(calls, graph)
    row["ours_eager"] = time_rotating(calls, graph=False, reps=20)
    nw = torch.ones(k, device=dev, dtype=torch.bfloat16)

    def layer(p):
        q, s, _, _ = ops.norm_quant(x, None, nw, None, "rms", 1e-6, 8, torch.bfloat16, False, False)
        return ops.linear_q(q, s, p[0], p[1], None, k, torch.bfloat16, "none", None)

    row["layer"] = time_rotating([lambda p=p: layer(p) for p in packed], graph)
    row["packed_gbs"] = n * k / 4 / (row["ours"] * 1e-6) / 1e9
    if m == 1:  # what any kernel reading the packed bytes takes in this harness (read_floor.py sweeps tiles)
        row["read_floor"] = read_floor_us(n * k // 4, FLOOR_TILES if DEVICE == "cuda" else FLOOR_TILES[:1])[0]
    return row


QAT_STEPS = 4  # steps per timed run: the host queues the next step while the GPU runs one, as in training


def bench_qat(m: int, n: int, k: int):
    out = {}
    for name, step in qat_steps(m, n, k).items():
        try:
            out[name] = time_rotating([step] * QAT_STEPS, graph=False, reps=10)
        except Exception as err:  # CUDA-graph modes: report the refusal, keep the rest of the table
            print(f"QAT {name} at {n}x{k} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            out[name] = float("nan")
    return out


def host_overhead(n: int = 8192, k: int = 8192) -> dict:
    """M=1 linear_q: time per call launched from Python (no graph) vs graph replay, and the
    host-side time of one call (perf_counter around the op, GPU never the bottleneck)."""
    calls = 200 if DEVICE == "cuda" else 2  # smoke runs: the launcher runs interpreted
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    xq, xs = ops.quantize_activations(x, 8)
    wq, ws = ops.quantize_weights(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16), "ternary", False)
    call = lambda: ops.linear_q(xq, xs, wq, ws, None, k, torch.bfloat16, "none", None)  # noqa: E731
    from bitcompile.kernels.ternary_matmul import ternary_matmul

    direct = lambda: ternary_matmul(xq, wq, k, xs, ws, None, torch.bfloat16)  # noqa: E731
    out = {"graph": time_rotating([call], graph=True), "eager": time_rotating([call], graph=False)}
    for name, fn in (("host_op", call), ("host_launcher", direct)):
        out[name] = host_us(fn, calls, warmup=calls // 10)
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    print(f"host profile of {calls} linear_q calls (M=1):\n" + text.getvalue(), flush=True)
    return out


def bench_conv(shapes) -> list[str]:
    """Packed-ternary implicit-GEMM conv (with its epilogue; and with the per-sample activation
    quantization before it) vs bf16 cuDNN, both layouts, weights warm."""
    rows = []
    for n, cin, cout, hw, k, stride in shapes:
        for name, layout in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            x = torch.randn(n, cin, hw, hw, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=layout)
            w = torch.randn(cout, cin, k, k, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=layout)
            xq, xs = ops.quantize_activations_per_sample(x, 8)
            wq, ws = ops.quantize_weights(w.flatten(1), "ternary", False)
            args = ([stride] * 2, [k // 2] * 2, [1, 1], 1)
            cudnn = time_rotating([lambda: F.conv2d(x, w, None, *args)], graph=True)
            ours = time_rotating([lambda: ops.lowbit_conv(x, w, None, xq, xs, wq, ws, *args)], graph=True)
            layer = time_rotating(
                [lambda: ops.lowbit_conv(x, w, None, *ops.quantize_activations_per_sample(x, 8), wq, ws, *args)],
                graph=True,
            )
            rows.append(
                f"| {n}×{cin}×{hw}² -> {cout}, {k}×{k}/{stride} | {name} | {cudnn:.1f} | {ours:.1f} | "
                f"{layer:.1f} | {cudnn / ours:.2f}×, {cudnn / layer:.2f}× |"
            )
    return rows


def compiled_decode(n: int = 8192, k: int = 8192) -> dict:
    """M=1 through ``torch.compile``, called from Python each time: an ``nn.Linear`` under the
    bitnet backend with our kernels launched by Inductor's code (``triton``) or through the
    opaque ops (``opaque``), and plain bf16 under Inductor (``bf16``); ``graphs`` / ``cpp``
    and their ``bf16_`` twins: replayed as CUDA graphs / launched by the C++ wrapper."""
    from bitcompile.passes import lower_triton

    layer = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16).eval()
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    out = {}
    lower = lower_triton.lower_to_triton
    graphs = {"mode": "reduce-overhead"}
    for name, backend, lowering, how in (
        ("triton", "bitnet", lower, {}),
        ("opaque", "bitnet", lambda gm, ctx: None, {}),
        ("bf16", "inductor", lower, {}),
        ("graphs", "bitnet", lower, graphs),
        ("bf16_graphs", "inductor", lower, graphs),
        ("cpp", "bitnet", lower, {"options": {"cpp_wrapper": True}}),
        ("bf16_cpp", "inductor", lower, {"options": cpp_wrapper_patches()}),  # (backend.cpp_wrapper_patches says why)
    ):
        torch._dynamo.reset()
        lower_triton.lower_to_triton = lowering
        fn = torch.compile(layer, backend=backend, **how)
        with torch.no_grad():
            out[name] = time_rotating([lambda: fn(x)], graph=False)
    lower_triton.lower_to_triton = lower
    return out


def matmul_rows(plan: dict, quick: bool, bw: float) -> list[str]:
    lines = [
        f"Measured copy bandwidth: {bw:.2f} TB/s. Times in µs (median, CUDA events, weights rotated through "
        "> 4× L2; every row by CUDA-graph replay, so launch overhead is excluded; `ours, eager launch` is the "
        "same call launched from Python each time). `ours` = packed-ternary matmul with dequant epilogue, bf16 "
        "out; `layer` = fused RMSNorm+quant kernel + matmul. `%BW` = packed weight bytes / time vs measured copy "
        "bandwidth.",
        "",
        "| M | N×K | bf16 F.linear | _int_mm | ours | ours, eager launch | layer | speed-up vs bf16 | %BW | target "
        "| met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = []
    for n, k in plan["shapes"]:
        for m in [1, 8192] if quick else plan["ms"]:
            row = bench_matmul(m, n, k)
            if "read_floor" in row:
                share = tb_per_s(n * k / 4, row["read_floor"]) / bw
                floors.append(
                    f"{n}×{k} {row['read_floor']:.1f} µs ({share:.0%}; "
                    f"ours {row['ours'] / row['read_floor']:.2f}× that)"
                )
            speed = row["bf16"] / row["ours"]
            share = row["packed_gbs"] / (bw * 1e3)
            target, bw_target = TARGETS.get((m, n, k)), BW_TARGETS.get((m, n, k))
            misses = ([] if target is None or speed >= target else [f"{speed / target:.2f} of the speed-up"]) + (
                [] if bw_target is None or share >= bw_target else [f"{share / bw_target:.2f} of the bandwidth"]
            )
            met = "" if target is None else ("yes" if not misses else f"NO ({', '.join(misses)})")
            wanted = ("" if target is None else f"≥{target}×") + ("" if bw_target is None else f", ≥{bw_target:.0%} BW")
            line = (
                f"| {m} | {n}×{k} | {row['bf16']:.1f} | {row.get('int_mm', float('nan')):.1f} | "
                f"{row['ours']:.1f} | {row['ours_eager']:.1f} | {row['layer']:.1f} | {speed:.2f}× | "
                f"{100 * share:.0f}% | {wanted} | {met} |"
            )
            print(line, flush=True)
            lines.append(line)
    return lines + [
        "",
        "Read floor (M=1 rows): a kernel that only reads the packed bytes (`read_floor.py`, its "
        "best of 6 one-warp tiles), timed the same way, and its share of the copy bandwidth: "
        + "; ".join(floors)
        + ".",
    ]


def qat_rows(plan: dict) -> list[str]:
    lines = [
        "QAT forward+backward of one layer, 8192 tokens, bf16 (Inductor = `torch.compile` of the usual "
        "fake-quant BitLinear formula; ours = bitnet ops on the Triton kernels, called eagerly; compiled = "
        'an `nn.Linear` under `torch.compile(backend="bitnet")`; speed-up = Inductor / the faster of the '
        "two; int8 grads = compiled with `grad_input_bits=8` (input gradient from int8 output gradients, not "
        "the exact STE), its speed-up alongside; pack = weight absmean+pack alone; every time per step, from "
        f"runs of {QAT_STEPS} consecutive steps, so the host queues a step while the GPU runs the one before, "
        "as in a training loop):",
        "",
        "| N×K | Inductor | ours | compiled | speed-up | target ≥1.2× | int8 grads | speed-up | pack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    launches = []
    for m, n, k in plan["qat"]:
        q = bench_qat(m, n, k)
        speed = q["inductor"] / min(q["ours"], q["compiled"])
        line = (
            f"| {n}×{k} | {q['inductor']:.0f} | {q['ours']:.0f} | {q['compiled']:.0f} | {speed:.2f}× | "
            f"{'yes' if speed >= 1.2 else f'NO ({speed / 1.2:.2f} of target)'} | {q['compiled_q8']:.0f} | "
            f"{q['inductor'] / q['compiled_q8']:.2f}× | {q['pack']:.0f} |"
        )
        print(line, flush=True)
        lines.append(line)
        for label, key in (("CUDA graphs", "graphs"), ("C++ wrapper", "cpp")):
            ours, ours_q8, ind = q[key], q[f"{key}_q8"], q[f"inductor_{key}"]
            launches.append(
                f"| {n}×{k} | {label} | {ours:.0f} | {ours_q8:.0f} | {ind:.0f} | {ind / ours:.2f}×, "
                f"{ind / ours_q8:.2f}× |"
            )
    print("\n".join(launches), flush=True)
    return lines + [
        "",
        "The same steps with both sides launched another way (CUDA graphs = "
        '`mode="reduce-overhead"`: no host time in the step; C++ wrapper = option `cpp_wrapper`: '
        "Inductor's launching code compiled as C++, less host time per step), exact STE and int8 grads "
        "against Inductor's time alongside:",
        "",
        "| N×K | launched by | compiled | int8 grads | Inductor | speed-ups |",
        "|---|---|---|---|---|---|",
        *launches,
    ]


def conv_rows(plan: dict) -> list[str]:
    rows = bench_conv(plan["conv"])
    print("\n".join(rows), flush=True)
    return [
        "Convolution (conv2d, bf16 out, input and weights in the row's layout; ours = packed-ternary "
        "implicit GEMM from int8 activations, then with the per-sample activation quantization before it "
        "(layer); CUDA-graph replay, weights warm):",
        "",
        "| input -> C_out, kernel/stride | layout | bf16 cuDNN | ours | layer | speed-ups |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def host_line(plan: dict) -> str:
    h = host_overhead(*plan["decode"])
    line = (
        f"Host overhead (M=1, 8192², one layer, weights warm in L2): graph replay {h['graph']:.1f} µs, "
        f"eager launches {h['eager']:.1f} µs per call; host time per call {h['host_op']:.1f} µs through "
        f"`torch.ops.bitnet.linear_q`, {h['host_launcher']:.1f} µs calling the launcher directly."
    )
    print(line, flush=True)
    return line


def decode_line(plan: dict) -> str:
    d = compiled_decode(*plan["decode"])
    line = (
        f'Compiled decode (M=1, 8192², `torch.compile(nn.Linear, backend="bitnet")` in eval, launched '
        f"from Python every call, no CUDA graph): {d['triton']:.1f} µs per call with the kernels launched by "
        f"Inductor's generated code (`triton_op`), {d['opaque']:.1f} µs through the opaque ops; bf16 under "
        f"Inductor {d['bf16']:.1f} µs; with the C++ wrapper (`cpp_wrapper`) {d['cpp']:.1f} µs vs bf16 "
        f'{d["bf16_cpp"]:.1f} µs. With `mode="reduce-overhead"` (CUDA graphs): {d["graphs"]:.1f} µs vs bf16 '
        f"{d['bf16_graphs']:.1f} µs (weights warm in L2 here)."
    )
    print(line, flush=True)
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT), help="the generated table (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="M=1 and 8192 only")
    args = parse_args(ap)
    plan = SMOKE if args.smoke else FULL
    bw = copy_bandwidth(plan["copy_bytes"])
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    lines = [
        "# Kernel benchmarks",
        "",
        f"Generated by `{command}` (`make bench` runs it); rewritten on every run, so notes belong in BENCHMARKS.md.",
        "",
        f"{datetime.date.today()} · {device_name()} · torch {torch.__version__} · triton {triton.__version__}"
        + (" · smoke run: tiny shapes, times mean nothing" if args.smoke else ""),
        "",
    ]
    lines += matmul_rows(plan, args.quick, bw) + [""] + qat_rows(plan) + ["", host_line(plan), ""]
    lines += conv_rows(plan) + ["", decode_line(plan)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
