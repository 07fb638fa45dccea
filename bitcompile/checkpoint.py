"""Packed checkpoints: the canonical 2-bit format (``numerics.packing``) with scales, in safetensors.

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
from bitcompile.numerics.packing import pack_ternary, unpack_ternary

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


def from_transformers_bitnet(packed: torch.Tensor, weight_scale: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' BitNet ``(weight uint8 [ceil(N/4), K], weight_scale)`` -> canonical
    ``(uint8 [N, ceil(K/4)], float32 s_w [1])``."""
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        raise ValueError("transformers BitNet weight contains the invalid code 3")
    trits = codes.to(torch.int8) - 1
    return pack_ternary(trits), (1.0 / weight_scale.float()).reshape(1)


def to_transformers_bitnet(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``(packed, s_w [1])`` -> transformers' BitNet ``(weight, weight_scale)``."""
    if scale.numel() != 1:
        raise ValueError("transformers' BitNet layout has one scale per tensor; this weight is per-channel")
    trits = unpack_ternary(packed, in_features)
    n = trits.shape[0]
    rows = (n + 3) // 4
    codes = torch.nn.functional.pad(trits + 1, (0, 0, 0, 4 * rows - n), value=1).to(torch.uint8)
    out = torch.zeros(rows, in_features, dtype=torch.uint8)
    for i in range(4):
        out |= codes[i * rows : (i + 1) * rows] << (2 * i)
    return out, (1.0 / scale.float()).reshape(1)
