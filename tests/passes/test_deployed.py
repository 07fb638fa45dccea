"""A deployed model (packed buffers only) compiles to what its float model compiles to."""

import copy

import pytest
import torch

import bitcompile
from tests.helpers import EXACT
from tests.passes.fusion_models import Attention

OPTIONS = [
    {},
    {"granularity": "per_channel"},
    {"weight": "binary"},
    {"weight": "int8"},
    {"activation_bits": None},
    {"activation_bits": 4},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_compiled_deployed_model_equals_the_compiled_float_model(options):
    torch.manual_seed(0)
    model, x = Attention(bias=True).eval(), torch.randn(2, 5, 32)
    deployed = bitcompile.deploy(copy.deepcopy(model), **options, exclude=[])
    with torch.no_grad():
        torch._dynamo.reset()
        want = torch.compile(model, backend="bitnet", options={**options, "exclude": []})(x)
        torch._dynamo.reset()
        got = torch.compile(deployed, backend="bitnet")(x)
        eager = deployed(x)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3)  # the norm fusion's float order (README)
