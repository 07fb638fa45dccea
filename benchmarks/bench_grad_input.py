"""The exact-STE input gradient ``g [M, N] @ (trits * s_w)`` at QAT shapes: every kernel family
(the canonical and transposed Triton kernels, the warp-specialised Gluon one) against bf16 cuBLAS
on the same GEMM, timed by ``timing.time_rotating`` (CUDA-graph replay, packed weights rotated
past the L2), each output checked bit for bit against the transposed kernel's.

``--limits`` also times variants of the Gluon kernel that only keep their timing meaning, to see
which side bounds it (docs/kernels.md): without the decode warps' work (they wait and
signal; the MMAs read whatever the trits buffer holds), with fixed valid trits (a hashed pattern
decoded once, out of the loop) stored every step or only into the SB buffers' first use, and
without the MMAs. cuBLAS is also timed on ternary weights (tensor-core power, and so the clock,
depends on the operands' bits).

``--host`` times the host side of one call at 256^3 (the GPU never the limit): the opaque op
``bitnet::grad_input_ws`` as compiled backward graphs call it, and ``launch``.

    python3 benchmarks/bench_grad_input.py [--limits] [--host]
    python3 benchmarks/bench_grad_input.py --smoke   # tiny shapes, any device: the script runs
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

from bitcompile.kernels import grad_input as gi
from bitcompile.kernels import grad_input_ws
from bitcompile.numerics.packing import pack_ternary

from timing import CUDA, DEVICE, copies, host_us, parse_args, time_rotating

SHAPES = [
    (8192, 4096, 4096, torch.bfloat16),
    (8192, 4096, 4096, torch.float16),
    (8192, 8192, 8192, torch.bfloat16),
    (8192, 4096, 14336, torch.bfloat16),
    (8192, 14336, 4096, torch.bfloat16),
]
SMOKE = [(20, 64, 64, torch.float16)]


def gluon_variant(name: str, edits: dict[str, str]):
    """``bitcompile/kernels/grad_input_ws.py`` with each source text of ``edits`` replaced, imported as a module."""
    src = Path(grad_input_ws.__file__).read_text()
    for old, new in edits.items():
        assert old in src, f"{name}: the kernel no longer has the text this variant replaces"
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / f"grad_input_ws_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_STORE = "            b_smem.index(i % SB).store(_decode(p_smem.index(s).load(layout), lo, hi, dtype))\n"
# A tile of valid codes, uniform over {0, 1, 2} like random trits, that varies over the tile's
# bytes (the same tile every step: it toggles fewer operand bits than real data, see the doc).
_CODES = "(" + " + ".join(f"((((h >> {8 * f}) & 0xFF) % 3) << {2 * f})" for f in range(4)) + ").to(gl.int8)"
_FIXED = (
    "        dtype: gl.constexpr = b_smem.type.element_ty\n",
    "        dtype: gl.constexpr = b_smem.type.element_ty\n"
    "        h = (gl.expand_dims(gl.arange(0, CH, layout=gl.SliceLayout(1, layout)), 1) * 40503\n"
    "             + gl.expand_dims(gl.arange(0, BK // 4, layout=gl.SliceLayout(0, layout)), 0) * 9973 + ZERO)\n"
    "        h = h * -1640531535\n"
    f"        trits = _decode({_CODES}, lo, hi, dtype)\n",
)
_FIXED_STORE = _STORE.replace("_decode(p_smem.index(s).load(layout), lo, hi, dtype)", "trits")
_MMA = (
    "            acc = warpgroup_mma(b_smem.index(i % SB).permute((1, 0)), g_smem.index(s).permute((1, 0)), "
    "acc,\n                                is_async=True)\n"
)
LIMITS = {
    "no decode": {_STORE: ""},
    "fixed trits every step": dict(
        [_FIXED, (_STORE, _FIXED_STORE), ("DECODE_REGS, MAX_REGS = 8, 4, 64,", "DECODE_REGS, MAX_REGS = 8, 4, 112,")]
    ),
    "fixed trits once": dict([_FIXED, (_STORE, "            if i < SB:\n    " + _FIXED_STORE)]),
    "no MMA": {_MMA: ""},
}


def bench(m: int, n: int, k: int, dtype: torch.dtype, limits: bool) -> None:
    g = torch.randn(m, n, device=DEVICE, dtype=dtype)
    packed = [
        pack_ternary(torch.randint(-1, 2, (n, k), device=DEVICE, dtype=torch.int8)) for _ in range(copies(n * k // 4))
    ]
    ws = torch.tensor([0.0173], device=DEVICE)
    weights = [torch.randn(n, k, device=DEVICE, dtype=dtype) for _ in range(copies(n * k * 2))]
    cublas = time_rotating([lambda w=w: g @ w for w in weights], graph=CUDA, reps=20)
    ternary = [(torch.randint(-1, 2, (n, k), device=DEVICE) * 0.0173).to(dtype) for _ in range(len(weights))]
    del weights
    cublas_ternary = time_rotating([lambda w=w: g @ w for w in ternary], graph=CUDA, reps=20)
    del ternary
    print(
        f"\n{m}x{n}x{k} {dtype}: cuBLAS {cublas:.1f} us ({2 * m * n * k / cublas / 1e6:.0f} TFLOPS); "
        f"on ternary weights {cublas_ternary:.1f} us",
        flush=True,
    )
    configs = gi._configs(transposed_ok=True, ws_ok=grad_input_ws.supports(g, packed[0], ws))
    families = {}  # the first configuration of each kernel family, the Gluon tiles each
    for cfg in configs:
        layout = cfg.get("layout", "canonical")
        families.setdefault(layout if layout != "ws" else str(cfg), cfg)
    reference = gi.grad_input(g, packed[0], ws, k, config=families["transposed"])
    for name, cfg in families.items():
        got = gi.grad_input(g, packed[0], ws, k, config=cfg)
        t = time_rotating([lambda p=p: gi.grad_input(g, p, ws, k, config=cfg) for p in packed], graph=CUDA, reps=20)
        print(
            f"  {name}: {t:.1f} us ({cublas / t:.3f}x cuBLAS), equal to transposed: {torch.equal(got, reference)}",
            flush=True,
        )
    if limits and grad_input_ws.supports(g, packed[0], ws):
        out = torch.empty(m, k, device=DEVICE, dtype=dtype)
        tile = grad_input_ws.CONFIGS[0]
        for name, edits in LIMITS.items():
            variant = gluon_variant(name.replace(" ", "_"), edits)
            t = time_rotating([lambda p=p: variant.launch(g, p, ws, out, **tile) for p in packed], graph=True, reps=20)
            print(f"  Gluon kernel, {name} (timing only): {t:.1f} us ({cublas / t:.3f}x cuBLAS)", flush=True)


def host_per_call(calls: int = 2000) -> None:
    """Host time per call (perf_counter over ``calls`` back-to-back calls at 256^3, where the
    GPU never limits): the op as compiled backward graphs call it, and the launch under it."""
    from bitcompile.ops.linear import grad_input_ws as op

    m = n = k = 256
    g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    wq = pack_ternary(torch.randint(-1, 2, (n, k), device=DEVICE, dtype=torch.int8))
    ws = torch.tensor([0.0173], device=DEVICE)
    out = torch.empty(m, k, device=DEVICE, dtype=torch.bfloat16)
    tile = grad_input_ws.CONFIGS[0]
    fields = [tile[f] for f in grad_input_ws.TILE]
    cases = {
        "op bitnet::grad_input_ws": lambda: op(g, wq, ws, k, fields),
        "grad_input_ws.launch": lambda: grad_input_ws.launch(g, wq, ws, out, **tile),
    }
    print("\nhost time per call, 256^3:")
    for name, fn in cases.items():
        print(f"  {name}: {host_us(fn, calls, warmup=50):.1f} us", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", action="store_true", help="also the timing-only variants of the Gluon kernel")
    parser.add_argument("--host", action="store_true", help="also the host time of one call of the Gluon kernel's op")
    args = parse_args(parser)
    torch.manual_seed(0)
    for m, n, k, dtype in SMOKE if args.smoke else SHAPES:
        bench(m, n, k, dtype, args.limits)
    if args.host and not args.smoke:
        host_per_call()


if __name__ == "__main__":
    main()
