"""``BitConfig``: every option of the ``bitnet`` backend.

The fields are also the keys of ``torch.compile(model, backend="bitnet", options={...})``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from bitcompile.numerics.spec import GRANULARITIES, WEIGHT_SCHEMES, check_bits

INDUCTOR_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class BitConfig:
    """Options of the ``bitnet`` backend.

    weight: ``"ternary"`` (BitNet b1.58 absmean, default), ``"binary"`` (sign, scale
        mean|W|) or ``"int8"`` (absmax / 127). Or a quantizer object (the weight-quantizer protocol
        ``bitcompile.quant.WeightQuantizer``: ``quantize``, ``dequantize``, ``parameters``): linears then
        run on its fake-quantized weights with its gradient rule, and its parameters are
        trained through the compiled graph. It is moved to ``weight_quantizer`` and
        ``weight`` becomes ``"ternary"``, the scheme of the other layer kinds (conv, attention).
    activation_bits: bits of the per-token absmax activation quantizer (2..8);
        ``None`` quantizes weights only and keeps activations in floating point.
    granularity: weight scale ``"per_tensor"`` or ``"per_channel"`` (one per output
        feature); ``None`` picks the scheme's default (per-tensor for ternary and
        binary, per-channel for int8).
    exclude: module-path glob patterns left in full precision. A pattern matches the
        whole path or any dotted suffix of it, so ``"lm_head"`` matches
        ``"model.lm_head"`` (transformers' convention). ``[]`` excludes nothing; ``None`` (or
        anything but a list of strings) is a ValueError, since it could mean "none" or "default".
    quantize_depthwise: also quantize depthwise convolutions (groups == in_channels, one
        kh*kw filter per channel: too few weights for a ternary scale to fit well); by
        default they stay in floating point and the report says so.
    attention_bits: quantize the two attention matmuls (QK^T and attention @ V) to
        int x int of this many bits (2..8) with one absmax scale per (batch, head);
        softmax stays in floating point. ``None`` (default) keeps them in floating point.
    grad_input_bits: QAT only: the input gradient of each quantized linear from the output
        gradient quantized per row to this many bits (2..8; int8 tensor cores instead of a
        16-bit matmul, as in SwitchBack, Wortsman et al. 2023); the weight gradient stays
        exact. ``None`` (default) keeps the exact STE gradient in the gradient's dtype.
    fuse: in inference graphs, fuse (residual add +) RMSNorm/LayerNorm with activation
        quantization, and a linear's following activation and residual add into its
        epilogue (``bitnet::norm_quant`` / ``bitnet::linear_q``). ``False`` keeps each
        linear as quantize -> matmul + dequantize.
    strict: raise instead of falling back to the unmodified graph if a pass fails.
    mode: the Inductor mode, as ``torch.compile(mode=...)``; ``torch.compile`` does not
        accept ``mode`` and ``options`` together, so it can be given here instead.
    cpp_wrapper: Inductor's C++ wrapper: the code that allocates buffers and launches the
        kernels of each compiled graph is C++ instead of Python. Less host time per call
        (for steps the host limits, without CUDA graphs; BENCHMARKS.md), a longer first
        compile (the wrapper is compiled by the C++ compiler; later runs hit Inductor's cache).
        Not with the modes that record CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``).

    The bool options (``strict``, ``cpp_wrapper``, ``fuse``, ``quantize_depthwise``) take only
    ``True`` or ``False``: anything else (``"no"``, ``0``, ``None``) is a ValueError.
    """

    weight: Any = "ternary"  # a scheme name, or a quantizer object (moved to weight_quantizer)
    activation_bits: Optional[int] = 8
    granularity: Optional[str] = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    strict: bool = False
    mode: Optional[str] = None
    cpp_wrapper: bool = False
    fuse: bool = True
    quantize_depthwise: bool = False
    attention_bits: Optional[int] = None
    grad_input_bits: Optional[int] = None
    weight_quantizer: Any = None  # a quantizer object for linears (see ``weight``)

    def __post_init__(self):
        if not isinstance(self.weight, str):
            check_quantizer(self.weight)  # names the missing methods
            self.weight_quantizer, self.weight = self.weight, "ternary"
        elif self.weight_quantizer is not None:
            check_quantizer(self.weight_quantizer)
        _check_choice("weight", self.weight, WEIGHT_SCHEMES)
        _check_choice("granularity", self.granularity, (None, *GRANULARITIES))
        _check_choice("mode", self.mode, INDUCTOR_MODES)
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                # Not by truthiness: fuse="no" would fuse.
                raise ValueError(f"invalid {f.name}={getattr(self, f.name)!r}; valid choices: False, True")
        if self.cpp_wrapper and self.mode in CUDA_GRAPH_MODES:
            raise ValueError(
                f"cpp_wrapper=True and mode={self.mode!r} do not combine: Inductor does not record "
                "CUDA graphs of C++-wrapper code; choose one (graphs remove the host time altogether)"
            )
        check_bits("attention_bits", self.attention_bits, "float attention matmuls")
        check_bits("activation_bits", self.activation_bits, "weight-only")
        check_bits("grad_input_bits", self.grad_input_bits, "exact STE input gradient")
        iterable = isinstance(self.exclude, Iterable) and not isinstance(self.exclude, (str, bytes))
        patterns = list(self.exclude) if iterable else None
        if patterns is None or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"exclude must be a list of module-path glob patterns ([] excludes nothing), got {self.exclude!r}"
            )
        self.exclude = patterns

    @property
    def per_channel(self) -> bool:
        if self.granularity is None:
            return self.weight == "int8"
        return self.granularity == "per_channel"

    def excluded(self, module_path: str) -> Optional[str]:
        """The pattern that excludes ``module_path``, or None."""
        return excluding_pattern(module_path, self.exclude)

    @classmethod
    def from_options(cls, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> "BitConfig":
        """Build from ``torch.compile`` options, naming any unknown key and the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown bitnet option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}"
            )
        if mode is not None:
            options.setdefault("mode", mode)
        return cls(**options)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"invalid {name}={value!r}; valid choices: {shown}")


def excluding_pattern(module_path: str, patterns) -> Optional[str]:
    """The first glob of ``patterns`` matching ``module_path`` or a dotted suffix of it
    (``"lm_head"`` matches ``"model.lm_head"``), or None."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(module_path, pattern) or fnmatch.fnmatchcase(module_path, "*." + pattern):
            return pattern
    return None


def check_quantizer(obj) -> None:
    """Raise a TypeError naming what is missing if ``obj`` is not a weight quantizer (an object
    with ``quantize``, ``dequantize`` and ``parameters``)."""
    missing = [m for m in ("quantize", "dequantize", "parameters") if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"{type(obj).__name__} is not a quantizer: it lacks {', '.join(missing)} "
            "(needs quantize, dequantize, parameters)"
        )
