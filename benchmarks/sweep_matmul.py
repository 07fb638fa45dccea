"""Every launch configuration of the packed-ternary matmul at the shapes with targets, timed as
``bench_kernels.py`` times (``timing.time_rotating``: CUDA-graph replay, packed weights rotated past the L2),
next to bf16 cuBLAS: which candidates win, by how much, and whether the shipped table holds the winner.

Also an experiment for large M: a plain int8 x int8 Triton GEMM on trits unpacked to int8
beforehand (pointer loads, and TMA descriptors where this Triton has them), to price staging
unpacked weights in memory against unpacking them in registers.

    python3 benchmarks/sweep_matmul.py [--shapes M,N,K ...] [--repeat R] [--traced] [--shipped-only]
                                          [--kernels gemv,gemm,wgmma,mma_sync] [--json results.json]
    python3 benchmarks/sweep_matmul.py --smoke   # tiny shapes, any device: the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bitcompile.kernels import ternary_matmul as tm
from bitcompile.kernels import tuning
from bitcompile.kernels.common import grouped_tile
from bitcompile.kernels.layout import relayout
from bitcompile.numerics import reference as ref

from timing import CUDA, DEVICE, copies, copy_bandwidth, device_name, parse_args, tb_per_s, time_rotating

DEFAULT_SHAPES = [(1, 8192, 8192), (1, 4096, 4096), (16, 8192, 8192), (128, 8192, 8192), (8192, 8192, 8192)]


@contextlib.contextmanager
def forced(cfg: dict):
    """The launcher runs ``cfg`` instead of consulting the tuning table."""
    choose = tuning.choose
    tuning.choose = lambda *args: cfg
    try:
        yield
    finally:
        tuning.choose = choose


def label(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "kernel") + f" [{cfg['kernel']}]"


@triton.jit
def _int8_mm_kernel(
    A,
    B,
    C,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # C = A @ B^T for int8 A [M, K], B [N, K] (whole tiles only), bf16 out (the dequant
    # multiply is left out: one FMA per output, noise at these sizes).
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = B + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)), acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    tl.store(C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def _int8_mm_tma_kernel(
    a_desc, b_desc, C, M, N, K, stride_cm, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr
):
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, K, BK):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), tl.trans(b_desc.load([pid_n * BN, k])), acc, out_dtype=tl.int32)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    tl.store(C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty))


INT8_TILES = [
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 4, 4),
    (128, 256, 64, 8, 4),
    (128, 128, 128, 8, 4),
    (128, 128, 64, 4, 5),
]


def int8_experiment(m: int, n: int, k: int, smoke: bool) -> list[tuple[str, float]]:
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEVICE)
    ws = [torch.randint(-1, 2, (n, k), dtype=torch.int8, device=DEVICE) for _ in range(copies(n * k))]
    c = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32)
    tiles = [(16, 16, 32, 4, 1)] if smoke else INT8_TILES
    rows = []
    for bm, bn, bk, warps, stages in tiles:
        if m % bm or n % bn or k % bk:
            continue
        grid = (m // bm * (n // bn),)
        name = f"BM={bm},BN={bn},BK={bk},warps={warps},stages={stages}"
        fns = [
            lambda w=w: _int8_mm_kernel[grid](
                a,
                w,
                c,
                m,
                n,
                k,
                a.stride(0),
                w.stride(0),
                c.stride(0),
                BM=bm,
                BN=bn,
                BK=bk,
                GROUP_N=8,
                num_warps=warps,
                num_stages=stages,
            )
            for w in ws
        ]
        rows.append((f"int8 pointers {name}", time_rotating(fns, graph=CUDA, reps=20)))
        if not CUDA:
            continue
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor

            ad = TensorDescriptor.from_tensor(a, [bm, bk])
            bds = [TensorDescriptor.from_tensor(w, [bn, bk]) for w in ws]
            fns = [
                lambda bd=bd: _int8_mm_tma_kernel[grid](
                    ad, bd, c, m, n, k, c.stride(0), BM=bm, BN=bn, BK=bk, GROUP_N=8, num_warps=warps, num_stages=stages
                )
                for bd in bds
            ]
            rows.append((f"int8 TMA {name}", time_rotating(fns, graph=True, reps=20)))
        except Exception as err:  # noqa: BLE001  (an experiment: report and go on)
            rows.append((f"int8 TMA {name}: failed {type(err).__name__}: {str(err)[:200]}", float("nan")))
    got = _check_int8(a, ws[0], c, tiles, m, n, k)
    rows.append((f"int8 GEMM exact vs torch: {got}", float("nan")))
    return rows


def _check_int8(a, w, c, tiles, m, n, k) -> bool:
    bm, bn, bk, warps, stages = next((t for t in tiles if not (m % t[0] or n % t[1] or k % t[2])), tiles[0])
    _int8_mm_kernel[(m // bm * (n // bn),)](
        a,
        w,
        c,
        m,
        n,
        k,
        a.stride(0),
        w.stride(0),
        c.stride(0),
        BM=bm,
        BN=bn,
        BK=bk,
        GROUP_N=8,
        num_warps=warps,
        num_stages=stages,
    )
    want = (a.float() @ w.float().t()).to(c.dtype)  # |sums| < 2^24: exact in fp32
    return bool(torch.equal(c, want))


def sweep(
    m: int,
    n: int,
    k: int,
    smoke: bool,
    bandwidth: float,
    repeat: int = 1,
    int8: bool = True,
    traced: bool = False,
    shipped_only: bool = False,
    kernels: Optional[set] = None,
) -> dict:
    # traced: launch as under torch.compile (a pass-through wrap: TMA descriptors built on the
    # device, split-K partials summed without stored copies).
    wrap = (lambda f: f) if traced else None
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    wb = [torch.randn(n, k, device=DEVICE, dtype=dtype) for _ in range(copies(n * k * 2))]
    bf16 = time_rotating([lambda w=w: F.linear(x, w) for w in wb], graph=CUDA)
    wq, w_scale = ref.quantize_weights(wb[0].float())
    del wb
    blocked = relayout(wq, k)
    packed = [blocked.clone() for _ in range(copies(blocked.numel()))]
    xq, xs = ref.quantize_activations(x.float(), 8)
    want = ref.lowbit_matmul(xq, wq, k)
    shipped = tuning._load(tuning.gpu_name()).get(f"ternary_mm:{tuning.bucket(m)},{n},{k}")
    # Candidates are timed in turn, `repeat` rounds over all of them: the spread across rounds
    # shows what a ranking is worth within one machine (across machines the same tile can read 9.9
    # and 11.5 us).
    runs = []
    for cfg in tm._candidates(m):
        if cfg != shipped and (shipped_only or (kernels and cfg["kernel"] not in kernels)):
            continue
        with forced(cfg):
            try:
                exact = torch.equal(tm.ternary_matmul(xq, blocked, k, layout="kblocked", wrap=wrap), want)
                fns = [
                    lambda p=p: tm.ternary_matmul(xq, p, k, xs, w_scale, None, dtype, layout="kblocked", wrap=wrap)
                    for p in packed
                ]
                fns[0]()
            except Exception as err:  # noqa: BLE001  (e.g. out of shared memory: report, go on)
                print(f"  {label(cfg)}: failed {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
        runs.append((cfg, exact, fns, []))
    for _ in range(repeat):
        for cfg, _, fns, times in runs:
            with forced(cfg):
                times.append(time_rotating(fns, graph=CUDA, reps=20))
    rows = [
        dict(
            config=cfg, us=statistics.median(times), spread=max(times) - min(times), exact=exact, shipped=cfg == shipped
        )
        for cfg, exact, _, times in runs
    ]
    rows.sort(key=lambda r: r["us"])
    # The floor of one call measured the same way (as many launches per graph as the rows
    # have): a 1-element kernel.
    one = torch.zeros(1, device=DEVICE)
    launch_us = time_rotating([one.zero_] * len(packed), graph=CUDA, reps=20)
    print(f"\nM={m} N={n} K={k}: bf16 cuBLAS {bf16:.1f} us; a 1-element kernel {launch_us:.1f} us", flush=True)
    for r in rows:
        tag = " <- shipped" if r["shipped"] else ""
        pct = 100 * tb_per_s(n * k / 4, r["us"]) / bandwidth if bandwidth else float("nan")
        spread = f" ±{r['spread'] / 2:.1f}" if repeat > 1 else ""
        print(
            f"  {r['us']:8.1f}{spread} us  {bf16 / r['us']:5.2f}x  {pct:3.0f}% BW  exact={r['exact']}  "
            f"{label(r['config'])}{tag}",
            flush=True,
        )
    out = dict(m=m, n=n, k=k, bf16_us=bf16, launch_us=launch_us, rows=rows)
    if int8 and (m >= 1024 or (smoke and m % 16 == 0)):  # whole tiles only
        out["int8_experiment"] = int8_experiment(m, n, k, smoke)
        for name, us in out["int8_experiment"]:
            print(f"  {us:8.1f} us  {bf16 / us:5.2f}x  {name}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", help="M,N,K triples")
    parser.add_argument("--json", help="write every timing here")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all candidates (median reported)")
    parser.add_argument("--no-int8", action="store_true", help="skip the unpacked int8 GEMM experiment")
    parser.add_argument("--traced", action="store_true", help="launch as torch.compile's generated code does")
    parser.add_argument("--shipped-only", action="store_true", help="time only the shipped table's choice")
    parser.add_argument(
        "--kernels",
        help="comma-separated kernel families (gemv, gemm, wgmma, mma_sync): time only their candidates and the "
        "shipped choice",
    )
    args = parse_args(parser)
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes]
        if args.shapes
        else [(1, 64, 96), (16, 64, 96), (64, 32, 64)]
        if args.smoke
        else DEFAULT_SHAPES
    )
    bandwidth = copy_bandwidth(2**20 if args.smoke else 2**30)
    print(
        f"copy bandwidth {bandwidth:.2f} TB/s; {device_name()}, torch {torch.__version__}, triton {triton.__version__}",
        flush=True,
    )
    kernels = set(args.kernels.split(",")) if args.kernels else None
    results = [
        sweep(m, n, k, args.smoke, bandwidth, args.repeat, not args.no_int8, args.traced, args.shipped_only, kernels)
        for m, n, k in shapes
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bandwidth, results=results), f, indent=1, default=str)


if __name__ == "__main__":
    main()
