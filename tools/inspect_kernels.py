"""Static profile of the packed-ternary matmul and the QAT ``grad_input`` kernel as they
compile for the H100 (sm_90), no GPU needed: for every configuration in the shipped tuning
table, registers, spills, shared memory and the main loop's instruction mix
(``tools/sass.py``).

    python tools/inspect_kernels.py [--shape 8192x8192] [--join-k] [--json]

Columns per loop step: instructions per thread, global loads (scalar / 16-byte),
``cp.async`` copies, shared-memory ops and barriers (layout conversions show up here),
``dp4a`` and tensor-core instructions, and tensor-core waits.
"""

from __future__ import annotations

import argparse
import json
import sys

import triton

from bitcompile.kernels import tuning

import sass

COLUMNS = (
    "regs",
    "spill_bytes",
    "smem_bytes",
    "loop_instructions",
    "ldg",
    "ldg128",
    "cp_async",
    "smem",
    "bar",
    "dp4a",
    "mma",
    "mma_wait",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help="only N x K, e.g. 8192x8192")
    parser.add_argument("--join-k", action="store_true", help="also profile each GEMM entry with JOIN_K=True")
    parser.add_argument("--gpu", default="NVIDIA_H100_80GB_HBM3", help="shipped table to read")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = parser.parse_args()
    if not sass.available():
        print("this Triton has no NVIDIA backend (ptxas/cuobjdump): nothing to inspect", file=sys.stderr)
        return 1
    table = json.loads((tuning.SHIPPED_DIR / f"{args.gpu}.json").read_text())
    if not args.json:
        print(f"Triton {triton.__version__}, target sm_90, table {args.gpu}\n")
        print("| kernel:M,N,K[,dtype] | config | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 2) + "|")
    dtypes = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
    for key, config in sorted(table.items(), key=lambda kv: (kv[0].split(":")[0], kv[0])):
        kernel, _, rest = key.partition(":")
        if kernel not in ("ternary_mm", "grad_input"):
            continue
        m, n, k = (int(v) for v in rest.split(",")[:3])
        if args.shape and args.shape != f"{n}x{k}":
            continue
        variants = [config]
        if args.join_k and config.get("kernel") == "gemm" and not config.get("JOIN_K"):
            variants.append(dict(config, JOIN_K=True))
        for cfg in variants:
            if kernel == "ternary_mm":
                case = sass.ternary_mm_case(cfg, m, n, k)
            else:
                case = sass.grad_input_case(cfg, m, n, k, dtypes[rest.split(",")[3]])
            stats = sass.profile(*case)
            if args.json:
                print(json.dumps(dict(key=key, config=cfg, **stats)), flush=True)
                continue
            shown = ",".join(f"{k_}={v}" for k_, v in cfg.items() if k_ not in ("GROUP_N", "GROUP_M"))
            print(f"| {key} | {shown} | " + " | ".join(str(stats[c]) for c in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
