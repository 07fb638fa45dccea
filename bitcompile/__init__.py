"""bitcompile: low-bit (ternary, binary, int8) networks as a torch.compile backend.

    compiled = torch.compile(model, backend="bitnet")
    model = bitcompile.compile(model, **options)   # in place: generate, Trainer, pipelines too

Importing this package is cheap: it registers the ``bitnet`` ops and nothing is
compiled until a compiled model first runs.
"""

from bitcompile.checkpoint import deploy, load_packed, save_packed
from bitcompile.compile_model import compile, report_of
from bitcompile.config import BitConfig
from bitcompile.explain import explain
from bitcompile.huggingface import (
    export_transformers,
    from_transformers_bitnet,
    load_transformers,
    to_transformers_bitnet,
)

__version__ = "0.1.0"
__all__ = [
    "BitConfig",
    "compile",
    "report_of",
    "explain",
    "save_packed",
    "load_packed",
    "deploy",
    "from_transformers_bitnet",
    "to_transformers_bitnet",
    "export_transformers",
    "load_transformers",
    "__version__",
    "Quantizer",
    "BitNetQuantizer",
]

# Model quantizers load on first use, keeping `import bitcompile` cheap.
_LAZY = {"Quantizer": "bitcompile.quantizers", "BitNetQuantizer": "bitcompile.quantizers"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitcompile' has no attribute {name!r}")
