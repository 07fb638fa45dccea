"""Small models and the eager-reference twin used by the compile tests."""

import copy

import torch
from torch import nn

from bitcompile.config import excluding_pattern
from bitcompile.nn import BitLinear

EXACT = dict(rtol=0, atol=0)  # bitwise equal


class MLP(nn.Module):
    def __init__(self, d_in=12, d_hidden=16, d_out=5, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.lm_head = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def swap_to_bitlinear(model, exclude=("lm_head",), **options):
    """A deep copy of ``model`` with every nn.Linear not excluded replaced by BitLinear."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not excluding_pattern(path, exclude):
                setattr(module, child_name, BitLinear.from_linear(child, **options))
    return twin
