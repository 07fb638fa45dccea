from bitcompile.kernels import codegen, grad_input_ws as ws
case = codegen.grad_input_case(dict(layout="ws", **ws.CONFIGS[0]), 8192, 4096, 4096, "bf16")
c = codegen.compile_sm90(*case)
t = c.asm["ttgir"]
import re
for line in t.splitlines():
    if line.startswith("#linear") or line.startswith("#mma") or "tt.store" in line or "reshape" in line or "trans" in line:
        print(line[:600])
