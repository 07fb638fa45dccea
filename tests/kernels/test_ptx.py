"""The kernels' inline PTX, executed on the CPU: a small interpreter for the instructions they
use runs the exact asm text against the plain-torch meaning of each snippet (the Triton
interpreter cannot run PTX, so the CPU suite would otherwise never execute it)."""
import re

import numpy as np
import pytest
import torch

from bitcompile.kernels.common import (KBLOCK_PTX, KBLOCK_PTX_Q0, KBLOCK_PTX_Q1, KBLOCK_PTX_Q2, KBLOCK_PTX_Q3,
                                      KBLOCK_PTX_T0, KBLOCK_PTX_T1, KBLOCK_PTX_T2, KBLOCK_PTX_T3, KBLOCK_PTX_W0,
                                      KBLOCK_PTX_W1, KBLOCK_PTX_W2, KBLOCK_PTX_W3, ONE_TABLES, PAIR_TABLE_WORDS,
                                      PAIR_TABLES, TRITS_PTX)
from bitcompile.kernels.grad_input import SCALED_TRITS_PTX, TRIT_PAIR_PTX
from bitcompile.kernels.grad_input_ws import DECODE_PTX_TEXT
from bitcompile.numerics.packing import pack_ternary, to_kblocked

MASK = 0xFFFFFFFF


def prmt(a, b, selector):
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``sel & 7`` of {b, a},
    or that byte's sign replicated when ``sel & 8``."""
    src = [(a >> 8 * i) & 255 for i in range(4)] + [(b >> 8 * i) & 255 for i in range(4)]
    out = 0
    for i in range(4):
        sel = (selector >> 4 * i) & 15
        byte = src[sel & 7]
        out |= ((255 if byte & 128 else 0) if sel & 8 else byte) << 8 * i
    return out


OPS = {
    "mov.b32": lambda a: a, "shr.b32": lambda a, b: a >> b, "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b, "sub.u32": lambda a, b: (a - b) & MASK,
    "mul.lo.u32": lambda a, b: (a * b) & MASK, "mad.lo.u32": lambda a, b, c: (a * b + c) & MASK, "prmt.b32": prmt,
}


def run_ptx(text: str, operands: dict) -> dict:
    """Execute ``text`` (one ``{ .reg ...; op d, a, b; ... }`` block) on 32-bit ``operands``
    {"$1": value, ...}; returns every register afterwards."""
    regs = dict(operands)
    body = text.strip().strip("{}")
    for statement in filter(None, (s.strip() for s in body.split(";"))):
        if statement.startswith(".reg"):
            continue
        op, args = statement.split(None, 1)
        dest, *srcs = (a.strip() for a in args.split(","))
        if op not in OPS:
            raise AssertionError(f"the test's PTX interpreter has no {op}: extend it")
        values = [int(s, 0) if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", s) else regs[s] for s in srcs]
        regs[dest] = OPS[op](*values) & MASK
    return regs


@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_trits_ptx(shift):
    rng = np.random.default_rng(shift)
    for word in rng.integers(0, 2**32, 2000, dtype=np.uint64).tolist():
        out = run_ptx(TRITS_PTX.value, {"$1": word, "$2": shift})["$0"]
        for byte in range(4):
            want = (((word >> 8 * byte) >> shift) & 3) - 1
            assert (out >> 8 * byte) & 255 == want & 255, (hex(word), shift, byte)


def test_scaled_trits_ptx():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        trits = rng.integers(-1, 2, 4).tolist()
        scale_bits = rng.integers(1, 0x7F80, 4).tolist()  # positive finite bf16/fp16-like patterns
        packed = sum((t & 255) << 8 * i for i, t in enumerate(trits))
        regs = run_ptx(SCALED_TRITS_PTX.value, {"$2": packed, **{f"${3 + i}": b for i, b in enumerate(scale_bits)}})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        want = [0 if t == 0 else b | (0x8000 if t < 0 else 0) for t, b in zip(trits, scale_bits)]
        assert got == want, (trits, scale_bits)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_trit_pair_ptx(dtype, shift):
    """Two packed bytes -> the 16-bit float bits of their trits at ``shift`` (-1.0, 0, 1.0)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lo, hi = ONE_TABLES[dtype]
    rng = np.random.default_rng(shift)
    for _ in range(1000):
        trits = rng.integers(-1, 2, (2, 4))  # two bytes, four fields each (code 3 is never packed)
        pair = sum(int(t + 1) << (8 * byte + 2 * field) for byte in range(2) for field, t in enumerate(trits[byte]))
        out = run_ptx(TRIT_PAIR_PTX.value, {"$1": pair, "$2": shift, "$3": lo, "$4": hi})["$0"]
        want = torch.tensor(trits[:, shift // 2], dtype=torch_dtype).view(torch.int16).tolist()
        assert [out & 0xFFFF, out >> 16] == [w & 0xFFFF for w in want], (trits, shift)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_ws_decode_ptx(dtype):
    """The warp-specialised input gradient's decode: one word of canonical bytes -> register 2s
    holds field s of bytes 0 and 1, register 2s + 1 field s of bytes 2 and 3, as 16-bit -1.0 /
    0 / 1.0 (low half first)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lo, hi = ONE_TABLES[dtype]
    rng = np.random.default_rng(1)
    for _ in range(1000):
        trits = torch.tensor(rng.integers(-1, 2, (1, 16)), dtype=torch.int16)  # k = 4 byte + field
        word = int(pack_ternary(trits)[0].view(torch.int32)[0]) & MASK
        regs = run_ptx(DECODE_PTX_TEXT, {"$8": word, "$9": lo, "$13": hi})
        bits = trits[0].to(torch_dtype).view(torch.int16).tolist()
        for s in range(4):
            for half, byte in ((0, 0), (0, 1), (1, 2), (1, 3)):
                got = (regs[f"${2 * s + half}"] >> 16 * (byte % 2)) & 0xFFFF
                assert got == bits[4 * byte + s] & 0xFFFF, (hex(word), s, byte)


def test_kblock_ptx():
    """A "nibbles" word of 16 random trits -> each quarter's 4 trits as signed bytes, by the
    four-quarter asm and by each one-quarter asm (tables immediate, and in registers: bytes, as
    the Gluon kernel packs them, or words, as the GEMV), against ``packing.to_kblocked``."""
    rng = np.random.default_rng(0)
    for _ in range(1000):
        trits = torch.tensor(rng.integers(-1, 2, 256), dtype=torch.int16)
        words = to_kblocked(pack_ternary(trits[None]), 256)[0].view(torch.int32).tolist()
        w = int(rng.integers(0, 16))
        word = words[w] & MASK
        quarters = run_ptx(KBLOCK_PTX.value, {"$4": word})
        singles = zip((KBLOCK_PTX_Q0, KBLOCK_PTX_Q1, KBLOCK_PTX_Q2, KBLOCK_PTX_Q3),
                      (KBLOCK_PTX_T0, KBLOCK_PTX_T1, KBLOCK_PTX_T2, KBLOCK_PTX_T3),
                      (KBLOCK_PTX_W0, KBLOCK_PTX_W1, KBLOCK_PTX_W2, KBLOCK_PTX_W3))
        for g, (one, from_register, from_word_tables) in enumerate(singles):
            want = sum((int(trits[64 * g + 4 * w + n]) & 255) << 8 * n for n in range(4))
            assert quarters[f"${g}"] == want, (hex(word), g)
            assert run_ptx(one.value, {"$1": word})["$0"] == want, (hex(word), g)
            a, b = PAIR_TABLES[2 * (g & 1):2 * (g & 1) + 2]  # the quarter parity's table, as the kernel passes it
            assert run_ptx(from_register.value, {"$1": word, "$2": a, "$6": b})["$0"] == want, (hex(word), g)
            a, b = (t & MASK for t in PAIR_TABLE_WORDS[2 * (g & 1):2 * (g & 1) + 2])  # int32 kernel values
            assert run_ptx(from_word_tables.value, {"$1": word, "$2": a, "$3": b})["$0"] == want, (hex(word), g)
