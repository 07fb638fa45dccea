"""A small interpreter for the PTX the kernels inline: the exact asm text runs on the CPU against the
plain-torch meaning of each snippet (the Triton interpreter cannot run PTX, so the CPU suite would
otherwise never execute it). Each kernel's test file checks its own snippets."""

import re

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
    "mov.b32": lambda a: a,
    "shr.b32": lambda a, b: a >> b,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "sub.u32": lambda a, b: (a - b) & MASK,
    "mul.lo.u32": lambda a, b: (a * b) & MASK,
    "mad.lo.u32": lambda a, b, c: (a * b + c) & MASK,
    "prmt.b32": prmt,
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
