"""Packed checkpoints: the canonical 2-bit format (DESIGN.md) with scales, in safetensors.

``save_packed`` writes a *deployment* checkpoint: every quantized linear's weight is
stored as its packed integers and scale, everything else as is. The latent
full-precision weights are not in it (keep a ``state_dict`` for that).
``load_packed`` restores such a file into a model of the same architecture: each
weight becomes its dequantized value, and the exact saved packed weights are
served to inference graphs through the weight cache until the weight changes.

``from_transformers_bitnet`` / ``to_transformers_bitnet`` convert to and from the
layout of transformers' BitNet integration, which packs four *rows* per byte
(``uint8 [ceil(N/4), K]``, row ``r + i*ceil(N/4)`` in bits ``2i..2i+1``) and stores
``weight_scale = 1 / s_w``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Union

import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.ops import WEIGHT_CACHE
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary, packed_columns, unpack_ternary
from bitcompile.numerics.spec import check_int

FORMAT = "bitcompile-packed/1"
PathLike = Union[str, os.PathLike]


def _quantizable(model: nn.Module, config: BitConfig) -> Iterable[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not config.excluded(name):
            yield name, module


def save_packed(model: nn.Module, path: PathLike, **options) -> dict[str, str]:
    """Write ``model`` to ``path`` (safetensors) with its linears packed as the backend
    would quantize them under ``options`` (``weight``, ``granularity``, ``exclude``).
    Returns ``{module path: scheme}`` of the packed layers."""
    from safetensors.torch import save_file

    config = BitConfig.from_options(options)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, module in _quantizable(model, config):
        wq, scale = ref.quantize_weights(module.weight.detach(), config.weight, config.per_channel)
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_packed"] = wq.contiguous()
        tensors[f"{name}.weight_scale"] = scale
        layers[name] = {"scheme": config.weight, "per_channel": config.per_channel, "k": module.in_features}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "layers": json.dumps(layers)})
    return {name: info["scheme"] for name, info in layers.items()}


def load_packed(model: nn.Module, path: PathLike) -> dict[str, str]:
    """Load a :func:`save_packed` file into ``model`` (in place). Raises ``ValueError``
    naming the first mismatch if the file does not fit the model."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a bitcompile packed checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(metadata["layers"])
    state = dict(tensors)
    packed = {}
    for name, info in layers.items():
        module = model.get_submodule(name)
        wq, scale = state.pop(f"{name}.weight_packed"), state.pop(f"{name}.weight_scale")
        if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (wq.shape[0], info["k"]):
            raise ValueError(f"packed layer {name!r} ({wq.shape[0]}x{info['k']}) does not match the model's {module}")
        state[f"{name}.weight"] = ref.dequantized_weight(wq, scale, info["k"], module.weight.dtype)
        packed[name] = (wq, scale, info)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    for name, (wq, scale, info) in packed.items():
        weight = model.get_submodule(name).weight
        WEIGHT_CACHE.put(weight, info["scheme"], info["per_channel"], (wq.to(weight.device), scale.to(weight.device)))
    return {name: info["scheme"] for name, info in layers.items()}


def _single_scale(name: str, scale) -> torch.Tensor:
    """``scale`` as a float32 ``[1]`` tensor; a ValueError unless it is one finite value > 0."""
    t = torch.as_tensor(scale)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a single value (transformers' BitNet layout has one scale per tensor: "
                         f"a per-channel scale does not convert), got {t.numel()} values")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a real number, got {t.dtype}")
    t = t.detach().float().reshape(1)
    if not (bool(torch.isfinite(t).all()) and float(t) > 0):
        raise ValueError(f"{name} must be finite and > 0, got {float(t)}")
    return t


def from_transformers_bitnet(packed: torch.Tensor, weight_scale: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' BitNet ``(weight uint8 [ceil(N/4), K], weight_scale)`` -> canonical
    ``(uint8 [N, ceil(K/4)], float32 s_w [1])``.

    Raises ``ValueError`` naming the problem if ``packed`` is not 2-D uint8, ``out_features`` is
    not in ``4 * (rows - 1) + 1 .. 4 * rows`` for its ``rows``, ``weight_scale`` is not one finite
    value > 0, or a code is the invalid 3."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        what = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed (transformers' weight) must be a 2-D uint8 tensor [ceil(out_features / 4), "
                         f"in_features], got {what}")
    check_int("out_features", out_features, 0)
    rows = packed.shape[0]
    if not 4 * (rows - 1) < out_features <= 4 * rows:
        valid = f"{4 * (rows - 1) + 1}..{4 * rows}" if rows else "0"
        raise ValueError(f"out_features={out_features} does not fit a weight of {rows} packed rows "
                         f"(four rows per byte): valid out_features {valid}")
    scale = _single_scale("weight_scale", weight_scale)
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        raise ValueError("transformers BitNet weight contains the invalid code 3")
    trits = codes.to(torch.int8) - 1
    return pack_ternary(trits), (1.0 / scale).to(packed.device)


def to_transformers_bitnet(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``(packed, s_w [1])`` -> transformers' BitNet ``(weight, weight_scale)``.

    Raises ``ValueError`` naming the problem if ``packed`` is not 2-D uint8 with
    ``ceil(in_features / 4)`` columns, ``scale`` is not one finite value > 0 (transformers' layout
    has one scale per tensor), or a code is the invalid 3."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        what = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a 2-D uint8 tensor [out_features, ceil(in_features / 4)], got {what}")
    check_int("in_features", in_features, 0)
    if packed.shape[1] != packed_columns(in_features):
        raise ValueError(f"in_features={in_features} needs {packed_columns(in_features)} packed columns, "
                         f"packed has {packed.shape[1]}")
    s = _single_scale("scale", scale)
    trits = unpack_ternary(packed, in_features)  # checks for the invalid code 3
    n = trits.shape[0]
    rows = (n + 3) // 4
    codes = torch.nn.functional.pad(trits + 1, (0, 0, 0, 4 * rows - n), value=1).to(torch.uint8)
    out = torch.zeros(rows, in_features, dtype=torch.uint8, device=packed.device)
    for i in range(4):
        out |= codes[i * rows : (i + 1) * rows] << (2 * i)
    return out, (1.0 / s).to(packed.device)
