import torch
from bitcompile.kernels.grad_input import grad_input
for dtype in (torch.bfloat16, torch.float16):
    g = torch.randn(1024, 2048, device="cuda", dtype=dtype)
    wq = torch.randint(0, 256, (2048, 1024), device="cuda", dtype=torch.uint8)
    grad_input(g, wq, torch.rand(1, device="cuda"), 4096)
