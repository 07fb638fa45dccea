"""What the matmul kernels compile to, without a GPU.

Triton's NVIDIA backend (and the ``ptxas``/``cuobjdump`` it bundles) compiles for a target
architecture on any machine. ``profile(kernel, args, constexprs, ...)`` compiles one
specialisation for sm_90 exactly as a launch would specialise it (pointers 16-byte
aligned, integers marked divisible by 16 or specialised when equal to 1) and reads the
SASS of its main loop: how many instructions per step, which loads (vector width,
``cp.async``), whether data moves through shared memory (``STS``/``LDS``/``BAR``), how many
``dp4a`` / tensor-core instructions, and how often the loop waits for the tensor cores.

This is how layout conversions hidden in a kernel are found before a GPU is at hand (e.g. a
GEMV tile that moves its operands through shared memory every step); timings still need one.
``tools/inspect_kernels.py`` prints the profile of every shipped configuration.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton

SASS_OP = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*)$", re.M)


def available() -> bool:
    """Whether this Triton can compile for NVIDIA GPUs here (its wheel ships ptxas)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(_tool("cuobjdump"))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def signature_type(value) -> str:
    """How a launch specialises an argument: pointers (torch allocations are 16-byte
    aligned) and integers divisible by 16 carry that fact; 1 becomes a constant."""
    if isinstance(value, str) and value.startswith("tensordesc"):
        return value
    if isinstance(value, str):  # a pointer type such as "*i8"
        return value + ":16"
    if isinstance(value, float):
        return "fp32"
    if value == 1:
        return "constexpr"
    return "i32:16" if value % 16 == 0 else "i32"


def compile_sm90(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None):
    """Compile ``kernel`` for sm_90. ``args``: every non-constexpr argument by name, a pointer
    as its Triton type string ("*i8") and an integer as its value; ``maxnreg``: the launch's
    register limit."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if getattr(kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            "kernels imported with TRITON_INTERPRET=1 run in the interpreter and cannot be "
            "compiled: inspect them in a process without it"
        )
    defaults = {p.name: p.default for p in kernel.params if p.default is not inspect.Parameter.empty}
    constexprs = {**{k: v for k, v in defaults.items() if k not in args}, **constexprs}  # as a launch omits them
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = signature_type(args[name])
        if kind == "constexpr":
            signature[name] = "constexpr"
            constants[name] = args[name]
            continue
        if kind.endswith(":16"):
            kind = kind[:-3]
            attrs[(index,)] = [["tt.divisibility", 16]]
        signature[name] = kind
    source = ASTSource(
        kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()}, attrs=attrs
    )
    options = dict(num_warps=num_warps, num_stages=num_stages) | ({"maxnreg": maxnreg} if maxnreg else {})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _run(tool: str, cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """Opcodes of the main loop: the smallest loop body (a backward branch and everything it
    jumps over) that does the matmul's arithmetic (tensor-core or dp4a instructions), else the
    largest loop. Smallest: a TMA kernel's barrier-wait retries branch back from the end of the
    kernel, so their spans hold the K loop and the epilogue."""
    ops = [(int(a, 16), op, rest) for a, op, rest in SASS_OP.findall(sass)]
    loops = []
    for address, op, rest in ops:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target[1], 16) < address:
            loops.append([o for a, o, _ in ops if int(target[1], 16) <= a <= address])
    computing = [body for body in loops if any(family(o) in ("mma", "dp4a") for o in body)]
    return min(computing, key=len) if computing else max(loops, key=len, default=[])


def family(op: str) -> str | None:
    """The class of a SASS opcode that the loop profile counts (None: not counted)."""
    if op.startswith("LDGSTS"):
        return "cp_async"
    if op.startswith("LDG"):
        return "ldg128" if ".128" in op else "ldg"
    if op.startswith(("LDS", "STS")):  # LDS, LDSM, STS, STSM
        return "smem"
    if op.startswith("BAR"):
        return "bar"
    if op.startswith("IDP"):
        return "dp4a"
    if op.startswith(("HGMMA", "IGMMA", "HMMA", "IMMA")):
        return "mma"
    if op.startswith("WARPGROUP.DEPBAR"):
        return "mma_wait"
    return None


FAMILIES = ("ldg", "ldg128", "cp_async", "smem", "bar", "dp4a", "mma", "mma_wait")


def profile(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
    """Resources and main-loop instruction counts of one specialisation (see module doc)."""
    compiled = compile_sm90(kernel, args, constexprs, num_warps, num_stages, maxnreg)
    usage = _run("cuobjdump", compiled.asm["cubin"], "-res-usage")
    regs, spill = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", usage).groups()
    loop = main_loop(_run("cuobjdump", compiled.asm["cubin"], "-sass"))
    counts = collections.Counter(family(op) for op in loop)
    return dict(
        regs=int(regs),
        spill_bytes=int(spill),
        smem_bytes=compiled.metadata.shared,
        loop_instructions=len(loop),
        **{f: counts[f] for f in FAMILIES},
    )


def ternary_mm_case(config: dict, m: int, n: int, k: int) -> tuple:
    """``(kernel, args, constexprs, num_warps, num_stages)`` of the packed-ternary matmul launch
    that ``kernels.ternary_matmul`` makes for a tuned ``config`` at ``m x n x k`` (bf16 output,
    per-tensor scale, no bias/activation/residual)."""
    from bitcompile.kernels import ternary_matmul as tm
    from bitcompile.kernels.layout import QUARTER
    from bitcompile.numerics.packing import kblocked_columns

    cfg = dict(config)
    kind = cfg.pop("kernel")
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
    flags = dict(EPILOGUE=True, PER_CHANNEL=False, HAS_BIAS=False, ACTIVATION=0, HAS_RES=False)
    pointers = dict(C="*bf16", XS="*fp32", WS="*fp32", BIAS="*bf16", RES="*bf16")
    kpb = kblocked_columns(k)
    if kind == "gemv":
        xw, pw = -(-k // 4), kpb // 4
        args = dict(
            A="*i32",
            P="*i32",
            **pointers,
            M=m,
            N=n,
            XW=xw,
            PW=pw,
            ZERO=0,
            stride_am=xw,
            stride_pn=pw,
            stride_cm=n,
            stride_rm=n,
        )
        even = pw % cfg["BW"] == 0 and xw == 4 * pw
        cfg.setdefault("R", 1)
        return (
            tm._gemv_kernel,
            args,
            dict(BM=triton.next_power_of_2(m), EVEN=even, USE_ASM=True, **flags, **cfg),
            warps,
            stages,
        )
    scratch = "*i32" if cfg["SPLIT_K"] > 1 else "*bf16"
    if kind in ("wgmma", "mma_sync"):
        return _wgmma_case(cfg, m, n, k, flags, pointers, scratch, warps, sync=kind == "mma_sync")
    args = dict(
        A="*i8",
        P="*u8",
        **pointers,
        PARTIAL=scratch,
        COUNT=scratch,
        M=m,
        N=n,
        K=k,
        KPB=kpb,
        stride_am=k,
        stride_pn=kpb,
        stride_cm=n,
        stride_rm=n,
    )
    cfg.setdefault("A_TMA", False)
    cfg.setdefault("HOST_DESC", cfg["A_TMA"])  # as an eager launch; False: as a traced one
    if cfg["HOST_DESC"]:  # a host TensorDescriptor of the activations, as the launcher builds it
        args["A"] = f"tensordesc<i8[{cfg['BM']}, {4 * QUARTER if cfg['JOIN_K'] else QUARTER}]>"
    constexprs = dict(Q=QUARTER, EVEN_K=k % (4 * QUARTER) == 0, USE_ASM=True, STORE_PARTIALS=True, **flags, **cfg)
    return tm._gemm_kernel, args, constexprs, warps, stages


def _wgmma_case(
    cfg: dict, m: int, n: int, k: int, flags: dict, pointers: dict, scratch: str, warps: int, sync: bool
) -> tuple:
    """The Gluon kernel's launch: its TMA descriptors' types as the launcher specialises them."""
    import torch
    from triton.runtime.jit import mangle_type

    from bitcompile.kernels import wgmma_matmul as wm
    from bitcompile.numerics.packing import kblocked_columns

    a = torch.empty(m, k, dtype=torch.int8)
    p = torch.empty(n, kblocked_columns(k), dtype=torch.int8)
    x_desc, p_desc = wm.descriptors(a, p, cfg["BN"], cfg["NB"], cfg.get("WIDE", False), sync)
    args = dict(
        x_desc=mangle_type(x_desc),
        p_desc=mangle_type(p_desc),
        TABLE="*i32",
        **pointers,
        PARTIAL=scratch,
        COUNT=scratch,
        M=m,
        N=n,
        STEPS=wm.step_count(p.shape[1], cfg["NB"]),
        stride_cm=n,
        stride_rm=n,
    )
    constexprs = dict(STAGES=cfg["STAGES"], SPLIT_K=cfg["SPLIT_K"], SYNC=sync, num_warps=warps, **flags)
    return wm._wgmma_kernel, args, constexprs, warps, 1


def grad_input_case(config: dict, m: int, n: int, k: int, dtype: str = "bf16") -> tuple:
    """The QAT backward's ``grad_input`` launch for a tuned ``config`` (per-tensor scale)."""
    from bitcompile.kernels import grad_input as gi
    from bitcompile.kernels.common import ONE_TABLES
    from bitcompile.kernels.layout import QUARTER
    from bitcompile.numerics.packing import kblocked_columns

    cfg = dict(config)
    layout = cfg.pop("layout", "canonical")
    if layout == "ws":
        return _grad_input_ws_case(cfg, m, n, k, dtype)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
    pointers = dict(G=f"*{dtype}", P="*u8", WS="*fp32", OUT=f"*{dtype}")
    if layout == "transposed":
        npb = kblocked_columns(n)
        args = dict(**pointers, M=m, N=n, K=k, NPB=npb, stride_g=n, stride_p=npb, stride_o=k)
        lo, hi = ONE_TABLES[dtype]
        constexprs = dict(Q=QUARTER, LO=lo, HI=hi, EVEN_N=n % (4 * QUARTER) == 0, USE_ASM=True, **cfg)
        return gi._grad_input_t_kernel, args, constexprs, warps, stages
    kb = -(-k // 4)
    args = dict(**pointers, M=m, N=n, K=k, KB=kb, stride_g=n, stride_p=kb, stride_o=k)
    flags = dict(PER_CHANNEL=False, IEEE=dtype == "fp32", EVEN_N=n % cfg["BN"] == 0, USE_ASM=True)
    return gi._grad_input_kernel, args, dict(**flags, **cfg), warps, stages


def _grad_input_ws_case(cfg: dict, m: int, n: int, k: int, dtype: str) -> tuple:
    """The Gluon input-gradient launch (``kernels.grad_input_ws.launch``), descriptors as it builds them."""
    import torch
    from triton.runtime.jit import mangle_type

    from bitcompile.kernels import grad_input_ws as ws

    g = torch.empty(m, n, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    p = torch.empty(n, -(-k // 4), dtype=torch.int8)
    g_desc, p_desc = ws.descriptors(g, p, cfg["BM"], cfg["BK"])
    args = dict(
        g_desc=mangle_type(g_desc),
        p_desc=mangle_type(p_desc),
        WS="*fp32",
        OUT=f"*{dtype}",
        M=m,
        K=k,
        STEPS=-(-n // ws.STEP),
        ZERO=0,
        stride_o=k,
    )
    constexprs = ws.constexprs(dtype, cfg["STAGES"], cfg["SB"], cfg["GROUP_K"])
    return ws.kernel(), args, dict(constexprs), ws.MMA_WARPS, 1, ws.MAX_REGS
