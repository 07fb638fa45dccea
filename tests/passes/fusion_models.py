"""Blocks written the way real models write them, for the fusion-pass tests."""

import torch
import torch.nn.functional as F
from torch import nn


class LlamaRMSNorm(nn.Module):
    """transformers' Llama/Mistral/Qwen RMSNorm, verbatim in behaviour (fp32 statistics)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Block(nn.Module):
    """Residual stream, a manual RMSNorm feeding q/k/v, nn.RMSNorm feeding a SiLU MLP."""

    def __init__(self, d=16, hidden=24):
        super().__init__()
        self.attn_norm = LlamaRMSNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-5)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        with torch.no_grad():
            self.attn_norm.weight.uniform_(0.5, 1.5)
            self.mlp_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, residual):
        h = x + residual
        a = self.attn_norm(h)
        h = h + self.q(a) * torch.sigmoid(self.k(a)) + self.v(a)
        return self.down(F.silu(self.up(self.mlp_norm(h)))) + h


class Epilogues(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(6))

    def forward(self, x):
        l0, l1, l2, l3, l4, l5 = self.layers
        n = self.norm(x)
        y = torch.relu(l0(n)) + F.gelu(l1(n)) + F.gelu(l2(n), approximate="tanh") + F.silu(l3(n))
        y = y + torch.relu(l4(n)).square()
        z = l5(y)
        return z + y, n * 2  # the residual `+ y`; the normalized tensor is also an output


class Attention(nn.Module):
    """q/k/v projections of one input (GQA-shaped k/v), with or without biases, and a gated MLP."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32, bias=bias), nn.Linear(32, 8, bias=bias), nn.Linear(32, 8, bias=bias)
        self.gate, self.up, self.down = nn.Linear(32, 48), nn.Linear(32, 48), nn.Linear(48, 32)
        self.norm = nn.RMSNorm(32)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        h = x + q + torch.cat([k, v], -1).repeat(1, 1, 2)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
