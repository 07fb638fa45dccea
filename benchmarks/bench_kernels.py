"""Kernel benchmark: one table, printed and written to BENCHMARKS.md.

    python benchmarks/bench_kernels.py [--out BENCHMARKS.md] [--quick | --smoke]

Every time is a median over repetitions measured with CUDA events. Weight buffers
are rotated (enough copies to exceed the L2 several times), so every call reads
its weights from HBM. The calls are captured in a CUDA graph and the graph is
replayed (launch overhead excluded, as in a decode loop or a compiled graph); our
matmul is also timed launched from Python each call ("eager launch"). A QAT step is timed
per step over runs of QAT_STEPS consecutive steps, launched from Python (or replayed, with
``mode="reduce-overhead"``): the host queues a step while the GPU runs the one before.

``--smoke`` runs every part at tiny shapes on whatever device there is (the CPU in CI,
with wall-clock timing): a check that the script runs, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import bitcompile.ops  # noqa: F401  (registers the bitnet ops)
from bitcompile.backend import cpp_wrapper_patches
from bitcompile.kernels import tuning

ops = torch.ops.bitnet
# A frame past Dynamo's recompile limit runs eagerly: here that would time the wrong code.
torch._dynamo.config.fail_on_recompile_limit_hit = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROTATE_BYTES = 4 * 50 * 2**20  # weight copies rotated through: 4x the H100's L2
FULL = dict(shapes=[(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)], ms=[1, 16, 128, 1024, 8192],
            qat=[(8192, 4096, 4096), (8192, 8192, 8192)], decode=(8192, 8192), copy_bytes=2**30,
            conv=[(32, 64, 64, 56, 3, 1), (32, 128, 256, 28, 3, 2), (32, 512, 512, 7, 3, 1), (32, 256, 64, 56, 1, 1)])
SMOKE = dict(shapes=[(64, 96)], ms=[1, 16, 40], qat=[(32, 64, 64)], decode=(64, 96), copy_bytes=2**20,
             conv=[(2, 8, 8, 6, 3, 1)])
TARGETS = {  # (M, N, K): minimum speed-up over bf16 cuBLAS (the project's performance targets)
    (1, 8192, 8192): 6.0, (1, 4096, 4096): 4.0, (16, 8192, 8192): 5.0, (128, 8192, 8192): 2.5, (8192, 8192, 8192): 1.3,
}
BW_TARGETS = {(1, 8192, 8192): 0.80}  # minimum share of the measured copy bandwidth on the packed bytes
FLOOR_TILES = [(chunk, block, 1) for chunk in (1024, 2048, 4096) for block in (256, 512)]  # read_floor's best (1 warp)


def copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(nbytes, 1)))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_rotating(fns, graph: bool, reps: int = 50) -> float:
    """Median microseconds of one call, cycling through ``fns`` (one per weight copy)."""
    for f in fns:  # compile / autotune / warm up
        f()
    sync()
    if DEVICE != "cuda":  # smoke runs: wall clock, no graphs
        times = []
        for _ in range(min(reps, 3)):
            start = time.perf_counter()
            for f in fns:
                f()
            times.append((time.perf_counter() - start) * 1e6 / len(fns))
        return statistics.median(times)
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for f in fns:
                    f()
        torch.cuda.current_stream().wait_stream(s)
        run, per = g.replay, len(fns)
    else:
        def run():
            for f in fns:
                f()
        per = len(fns)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if graph:  # busy the GPU while the host submits the graph, so the graph's launch latency
            # is not timed (a 1-node graph reads 17 us without this; other rows move by <= 4%)
            torch.cuda._sleep(tuning.SLEEP_CYCLES)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per)
    return statistics.median(times)


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = time_rotating([lambda: dst.copy_(src)], graph=False, reps=20)
    return 2 * src.numel() / (us * 1e-6) / 1e12


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
    if m == 1:  # what any kernel reading the packed bytes takes in this harness (read_floor.py)
        sys.modules.setdefault("bench_kernels", sys.modules[__name__])  # read_floor's import: this instance
        from read_floor import floor_us
        row["read_floor"] = floor_us(n * k // 4, FLOOR_TILES if DEVICE == "cuda" else FLOOR_TILES[:1])[0]
    return row


def eager_bitlinear(x, w):
    """The usual BitNet b1.58 layer as people write it (fake-quant + F.linear, STE via detach)."""
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = x + ((x * s).round().clamp(-128, 127) / s - x).detach()
    sw = 1.0 / w.abs().mean().clamp(min=1e-5)
    wq = w + ((w * sw).round().clamp(-1, 1) / sw - w).detach()
    return F.linear(xq, wq)


def bitnet_ops_layer(x, w):
    xq, xs = ops.quantize_activations(x, 8)
    wq, ws = ops.quantize_weights(w, "ternary", False)
    return ops.lowbit_linear(x, w, None, xq, xs, wq, ws)


def qat_steps(m: int, n: int, k: int) -> dict:
    """One QAT layer forward + backward at ``m`` tokens, bf16: ``inductor`` (the usual
    fake-quant formula under ``torch.compile``), ``ours`` (the bitnet ops called eagerly),
    ``compiled`` (the product: a plain ``nn.Linear`` made a QAT layer by the bitnet backend,
    same quantizers, its ops called from AOTAutograd's compiled graphs) and ``compiled_q8``
    (the same with ``grad_input_bits=8``: int8 output gradients for the input gradient);
    ``graphs`` / ``graphs_q8`` / ``inductor_graphs``: ``compiled`` / ``compiled_q8`` /
    ``inductor`` with ``mode="reduce-overhead"`` (CUDA graphs: the host's launch cost leaves
    the step, so these hold on a slow or busy host); ``cpp`` / ``cpp_q8`` / ``inductor_cpp``:
    the same launched by Inductor's C++ wrapper (``cpp_wrapper``: less host time per step).
    Also ``pack``: the weight absmean + pack alone."""
    # The compiled nn.Modules share one frame (Dynamo's module wrapper), so each variant is
    # a cache entry of that frame: start empty, or a second shape passes the recompile limit.
    torch._dynamo.reset()
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    linear = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    compiled = torch.compile(linear, backend="bitnet")
    compiled_q8 = torch.compile(linear, backend="bitnet", options={"grad_input_bits": 8})
    graphs = torch.compile(linear, backend="bitnet", options={"mode": "reduce-overhead"})
    graphs_q8 = torch.compile(linear, backend="bitnet", options={"mode": "reduce-overhead", "grad_input_bits": 8})
    inductor_graphs = torch.compile(eager_bitlinear, mode="reduce-overhead")
    cpp = torch.compile(linear, backend="bitnet", options={"cpp_wrapper": True})
    cpp_q8 = torch.compile(linear, backend="bitnet", options={"cpp_wrapper": True, "grad_input_bits": 8})
    steps = {}
    for name, fn in (("inductor", torch.compile(eager_bitlinear)), ("ours", bitnet_ops_layer),
                     ("compiled", lambda x, w: compiled(x)), ("compiled_q8", lambda x, w: compiled_q8(x)),
                     ("graphs", lambda x, w: graphs(x)), ("graphs_q8", lambda x, w: graphs_q8(x)),
                     ("inductor_graphs", inductor_graphs), ("cpp", lambda x, w: cpp(x)),
                     ("cpp_q8", lambda x, w: cpp_q8(x)),
                     ("inductor_cpp", torch.compile(eager_bitlinear, options=cpp_wrapper_patches()))):
        def step(fn=fn, graphed=name.endswith("graphs")):
            x.grad = w.grad = linear.weight.grad = None
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            fn(x, w).backward(g)
        steps[name] = step
    steps["pack"] = lambda: ops.quantize_weights(w.detach(), "ternary", False)
    return steps


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
        for _ in range(calls // 10):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out[name] = (time.perf_counter() - t0) / calls * 1e6
        sync()
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
            layer = time_rotating([lambda: ops.lowbit_conv(x, w, None, *ops.quantize_activations_per_sample(x, 8),
                                                           wq, ws, *args)], graph=True)
            rows.append(f"| {n}×{cin}×{hw}² -> {cout}, {k}×{k}/{stride} | {name} | {cudnn:.1f} | {ours:.1f} | "
                        f"{layer:.1f} | {cudnn / ours:.2f}×, {cudnn / layer:.2f}× |")
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
        ("triton", "bitnet", lower, {}), ("opaque", "bitnet", lambda gm, ctx: None, {}), ("bf16", "inductor", lower, {}),
        ("graphs", "bitnet", lower, graphs), ("bf16_graphs", "inductor", lower, graphs),
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="M=1 and 8192 only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script runs")
    args = ap.parse_args()
    global ROTATE_BYTES
    plan = SMOKE if args.smoke else FULL
    if args.smoke:
        ROTATE_BYTES = 0
    elif DEVICE != "cuda":
        ap.error("the benchmark needs a CUDA GPU (--smoke runs it at tiny shapes on the CPU)")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    bw = copy_bandwidth(plan["copy_bytes"])
    lines = [
        "# Benchmarks", "",
        f"{datetime.date.today()} · {device} · torch {torch.__version__} · triton {triton.__version__}"
        + (" · smoke run: tiny shapes, times mean nothing" if args.smoke else ""), "",
        f"Measured copy bandwidth: {bw:.2f} TB/s. Times in µs (median, CUDA events, weights rotated through "
        f"> 4× L2; every row by CUDA-graph replay, so launch overhead is excluded; `ours, eager launch` is the same call launched from Python each time). `ours` = packed-ternary matmul with dequant epilogue, bf16 out; "
        f"`layer` = fused RMSNorm+quant kernel + matmul. `%BW` = packed weight bytes / time vs measured copy bandwidth.", "",
        "| M | N×K | bf16 F.linear | _int_mm | ours | ours, eager launch | layer | speed-up vs bf16 | %BW | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = []
    for n, k in plan["shapes"]:
        for m in ([1, 8192] if args.quick else plan["ms"]):
            row = bench_matmul(m, n, k)
            if "read_floor" in row:
                floors.append(f"{n}×{k} {row['read_floor']:.1f} µs ({n * k / 4 / row['read_floor'] / 1e6 / bw:.0%}; "
                              f"ours {row['ours'] / row['read_floor']:.2f}× that)")
            speed = row["bf16"] / row["ours"]
            share = row["packed_gbs"] / (bw * 1e3)
            target, bw_target = TARGETS.get((m, n, k)), BW_TARGETS.get((m, n, k))
            misses = ([] if target is None or speed >= target else [f"{speed / target:.2f} of the speed-up"]) + \
                ([] if bw_target is None or share >= bw_target else [f"{share / bw_target:.2f} of the bandwidth"])
            met = "" if target is None else ("yes" if not misses else f"NO ({', '.join(misses)})")
            wanted = ("" if target is None else f"≥{target}×") + ("" if bw_target is None else f", ≥{bw_target:.0%} BW")
            line = (f"| {m} | {n}×{k} | {row['bf16']:.1f} | {row.get('int_mm', float('nan')):.1f} | {row['ours']:.1f} | "
                    f"{row['ours_eager']:.1f} | {row['layer']:.1f} | {speed:.2f}× | {100 * share:.0f}% | {wanted} | {met} |")
            print(line, flush=True)
            lines.append(line)
    lines += ["", "Read floor (M=1 rows): a kernel that only reads the packed bytes (`read_floor.py`, its best "
              "of 6 one-warp tiles), timed the same way, and its share of the copy bandwidth: " + "; ".join(floors) + ".",
              "", "QAT forward+backward of one layer, 8192 tokens, bf16 (Inductor = `torch.compile` of the usual "
              "fake-quant BitLinear formula; ours = bitnet ops on the Triton kernels, called eagerly; compiled = "
              "an `nn.Linear` under `torch.compile(backend=\"bitnet\")`; speed-up = Inductor / the faster of the two; "
              "int8 grads = compiled with `grad_input_bits=8` (input gradient from int8 output gradients, not the "
              "exact STE), its speed-up alongside; pack = weight absmean+pack alone; every time per step, from runs "
              f"of {QAT_STEPS} consecutive steps, so the host queues a step while the GPU runs the one before, as in a "
              "training loop):", "",
              "| N×K | Inductor | ours | compiled | speed-up | target ≥1.2× | int8 grads | speed-up | pack |",
              "|---|---|---|---|---|---|---|---|---|"]
    launches = []
    for m, n, k in plan["qat"]:
        q = bench_qat(m, n, k)
        speed = q["inductor"] / min(q["ours"], q["compiled"])
        line = (f"| {n}×{k} | {q['inductor']:.0f} | {q['ours']:.0f} | {q['compiled']:.0f} | {speed:.2f}× | "
                f"{'yes' if speed >= 1.2 else f'NO ({speed / 1.2:.2f} of target)'} | {q['compiled_q8']:.0f} | "
                f"{q['inductor'] / q['compiled_q8']:.2f}× | {q['pack']:.0f} |")
        print(line, flush=True)
        lines.append(line)
        for label, key in (("CUDA graphs", "graphs"), ("C++ wrapper", "cpp")):
            ours, ours_q8, ind = q[key], q[f"{key}_q8"], q[f"inductor_{key}"]
            launches.append(f"| {n}×{k} | {label} | {ours:.0f} | {ours_q8:.0f} | {ind:.0f} | {ind / ours:.2f}×, "
                            f"{ind / ours_q8:.2f}× |")
    lines += ["", "The same steps with both sides launched another way (CUDA graphs = `mode=\"reduce-overhead\"`: "
              "no host time in the step; C++ wrapper = option `cpp_wrapper`: Inductor's launching code compiled as "
              "C++, less host time per step), exact STE and int8 grads against Inductor's time alongside:", "",
              "| N×K | launched by | compiled | int8 grads | Inductor | speed-ups |", "|---|---|---|---|---|---|",
              *launches]
    print("\n".join(launches), flush=True)
    h = host_overhead(*plan["decode"])
    lines += ["", f"Host overhead (M=1, 8192², one layer, weights warm in L2): graph replay {h['graph']:.1f} µs, "
              f"eager launches {h['eager']:.1f} µs per call; host time per call {h['host_op']:.1f} µs through "
              f"`torch.ops.bitnet.linear_q`, {h['host_launcher']:.1f} µs calling the launcher directly."]
    print(lines[-1], flush=True)
    lines += ["", "Convolution (conv2d, bf16 out, input and weights in the row's layout; ours = packed-ternary "
              "implicit GEMM from int8 activations, then with the per-sample activation quantization before it "
              "(layer); CUDA-graph replay, weights warm):", "",
              "| input -> C_out, kernel/stride | layout | bf16 cuDNN | ours | layer | speed-ups |",
              "|---|---|---|---|---|---|"]
    conv_rows = bench_conv(plan["conv"])
    print("\n".join(conv_rows), flush=True)
    lines += conv_rows
    d = compiled_decode(*plan["decode"])
    lines += ["", f"Compiled decode (M=1, 8192², `torch.compile(nn.Linear, backend=\"bitnet\")` in eval, launched from "
              f"Python every call, no CUDA graph): {d['triton']:.1f} µs per call with the kernels launched by Inductor's "
              f"generated code (`triton_op`), {d['opaque']:.1f} µs through the opaque ops; bf16 under Inductor "
              f"{d['bf16']:.1f} µs; with the C++ wrapper (`cpp_wrapper`) {d['cpp']:.1f} µs vs bf16 {d['bf16_cpp']:.1f} µs. "
              f"With `mode=\"reduce-overhead\"` (CUDA graphs): {d['graphs']:.1f} µs vs bf16 {d['bf16_graphs']:.1f} µs "
              "(weights warm in L2 here)."]
    print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
