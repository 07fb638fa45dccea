"""Decode partition loop of the WS kernel (sm_90 SASS): instruction mix."""
import collections, re, sys
from bitcompile.kernels import codegen, grad_input_ws as ws
cfg = dict(layout="ws", **ws.CONFIGS[0])
case = codegen.grad_input_case(cfg, 8192, 4096, 4096, "bf16")
compiled = codegen.compile_sm90(*case)
sass = codegen._run("cuobjdump", compiled.asm["cubin"], "-sass")
ops = [(int(a, 16), op, rest) for a, op, rest in codegen.SASS_OP.findall(sass)]
loops = []
for address, op, rest in ops:
    t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
    if t and int(t[1], 16) < address:
        loops.append([o for a, o, _ in ops if int(t[1], 16) <= a <= address])
for body in loops:
    c = collections.Counter(o.split(".")[0] for o in body)
    if c["PRMT"] or c["HGMMA"]:
        print(len(body), dict(c.most_common(14)))
