"""Packed checkpoints (safetensors) and deployment.

``save_packed`` writes a *deployment* checkpoint: each linear the backend would quantize is
stored as its packed codes (``<layer>.weight_packed``, the canonical format of
``numerics.packing``, or int8) and float32 scale (``<layer>.weight_scale``), everything else as
is. ``load_packed`` checks the whole file against the model before it changes anything, then
either rebuilds latent float weights that quantize back to the saved codes and scales (a model
that trains and infers as the saved one) or, with ``deploy=True``, swaps the layers for
``PackedLinear`` (packed weights only: inference, a fraction of the memory). ``deploy`` does the
latter for a model in memory.

transformers' BitNet format (its layout, export and import) is ``bitcompile.huggingface``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Union

import torch
from torch import nn

from bitcompile.config import BitConfig
from bitcompile.nn.packed_linear import PackedLinear
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import packed_columns, unpack_ternary
from bitcompile.numerics.spec import WEIGHT_SCHEMES, weight_skip_reason

FORMAT = "bitcompile-packed/1"
PathLike = Union[str, os.PathLike]
_WRAPPER_PREFIX = "_orig_mod."  # state-dict keys of a torch.compile wrapper


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def quantized_layers(model: nn.Module, config: BitConfig) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of the linears the backend quantizes under ``config`` (float weights,
    not excluded, not tied to an embedding table), and of layers already packed."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield name, module
        elif (
            type(module) is nn.Linear
            and isinstance(module.weight, nn.Parameter)
            and not config.excluded(name)
            and not weight_skip_reason(module.weight)
            and id(module.weight) not in embedding_weights
        ):
            yield name, module


def save_packed(model: nn.Module, path: PathLike, **options) -> dict[str, str]:
    """Write ``model`` to ``path`` (safetensors) with its linears packed as the backend would
    quantize them under ``options`` (``weight``, ``granularity``, ``exclude``,
    ``activation_bits``). Returns ``{module path: scheme}`` of the packed layers."""
    from safetensors.torch import save_file

    model = unwrap(model)
    config = BitConfig.from_options(options)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, module in quantized_layers(model, config):
        prefix = f"{name}." if name else ""
        if isinstance(module, PackedLinear):
            wq, scale, layer_config = module.weight_packed, module.weight_scale, module.config
        else:
            wq, scale = ref.quantize_weights(module.weight.detach(), config.weight, config.per_channel)
            layer_config = config
            del tensors[f"{prefix}weight"]
        tensors[f"{prefix}weight_packed"], tensors[f"{prefix}weight_scale"] = wq.contiguous(), scale.contiguous()
        layers[name] = {
            "scheme": layer_config.weight,
            "per_channel": layer_config.per_channel,
            "k": module.in_features,
            "n": module.out_features,
            "activation_bits": layer_config.activation_bits,
        }
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "layers": json.dumps(layers)})
    return {name: info["scheme"] for name, info in layers.items()}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    scheme: str
    per_channel: bool
    activation_bits: object
    codes: torch.Tensor  # int8 [N, K]: trits, signs or int8 values
    packed: torch.Tensor
    scale: torch.Tensor


def load_packed(model: nn.Module, path: PathLike, *, deploy: bool = False) -> dict[str, str]:
    """Load a :func:`save_packed` file into ``model`` (same architecture; a ``torch.compile``
    wrapper's model too), in place. Returns ``{module path: scheme}``.

    The whole file is checked against the model first (layer names, shapes, dtypes, schemes,
    scales, codes, every other tensor) and a ``ValueError`` naming the file and the entry is
    raised before anything changes. Then each packed layer gets latent float weights that
    the backend quantizes back to the saved codes and scale (``reference.latent_weights``: the
    model trains and infers as the saved one), or, with ``deploy=True``, becomes a
    ``PackedLinear`` holding only the saved packed weights (inference, bitwise the saved model)."""
    if not isinstance(deploy, bool):
        raise TypeError(f"deploy must be True or False, got {deploy!r}")
    model = unwrap(model)
    where = os.fspath(path)
    tensors, layers = _read(where)
    packed = [_check_layer(model, where, name, info, tensors) for name, info in layers.items()]
    state = _check_rest(model, where, tensors, packed, deploy)
    for layer in packed:
        prefix = f"{layer.name}." if layer.name else ""
        if deploy and not isinstance(layer.module, PackedLinear):
            replacement = PackedLinear(
                layer.module.in_features,
                layer.module.out_features,
                layer.module.bias is not None,
                weight=layer.scheme,
                per_channel=layer.per_channel,
                activation_bits=layer.activation_bits,
                device=layer.module.weight.device,
                dtype=layer.module.weight.dtype,
            )
            _set_submodule(model, layer.name, replacement)
        if isinstance(_get_submodule(model, layer.name), PackedLinear):
            state[f"{prefix}weight_packed"], state[f"{prefix}weight_scale"] = layer.packed, layer.scale
        else:
            weight = layer.module.weight
            state[f"{prefix}weight"] = ref.latent_weights(
                layer.codes, layer.scale, layer.scheme, layer.per_channel, weight.dtype
            )
    model.load_state_dict(state, strict=True)
    return {layer.name: layer.scheme for layer in packed}


EXCLUDED_WEIGHTS = ("float", "int8")


def deploy(model: nn.Module, *, excluded_weights: str = "float", **options) -> nn.Module:
    """Swap, in place, every linear the backend would quantize under ``options`` for a
    ``PackedLinear`` holding only its packed weights and scale (its float weight is freed), and
    return the model: the memory of inference, not of training. The deployed model runs eager
    or compiled with ``backend="bitnet"`` (same outputs as the compiled float model in
    inference) and refuses to train.

    ``excluded_weights``: what becomes of the linears ``options`` exclude (by default
    ``lm_head``). ``"float"`` (default) keeps them as they are. ``"int8"`` stores their weights as
    int8 with one absmax scale per output row, activations staying in floating point
    (``PackedLinear(weight="int8", activation_bits=None)``: weight-only, post-training): at decode
    each token reads an ``lm_head`` once, and int8 halves what its 16-bit weights cost, for an
    error of at most half a step (max|row| / 254) per weight. A linear whose weight is tied to an
    embedding table stays float (the embedding needs the weight), with a warning."""
    if excluded_weights not in EXCLUDED_WEIGHTS:
        raise ValueError(
            f"invalid excluded_weights={excluded_weights!r}; valid choices: {', '.join(map(repr, EXCLUDED_WEIGHTS))}"
        )
    model = unwrap(model)
    config = BitConfig.from_options(options)
    for name, module in list(quantized_layers(model, config)):
        if not isinstance(module, PackedLinear):
            _set_submodule(model, name, PackedLinear.from_linear(module, **{**options, "exclude": []}))
    if excluded_weights == "int8":
        _deploy_excluded_int8(model, config)
    return model


def _deploy_excluded_int8(model: nn.Module, config: BitConfig) -> None:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not config.excluded(name) or weight_skip_reason(module.weight):
            continue
        if id(module.weight) in embedding_weights:
            warnings.warn(
                f"deploy(excluded_weights='int8'): {name} stays float: its weight is tied to an embedding table",
                stacklevel=3,
            )
            continue
        int8 = dict(weight="int8", granularity="per_channel", activation_bits=None)
        _set_submodule(model, name, PackedLinear.from_linear(module, **int8))


def _read(where: str) -> tuple[dict, dict]:
    """``(tensors, layers)`` of a packed checkpoint, wrapper prefixes stripped."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(where):
        raise FileNotFoundError(f"no packed checkpoint at {where}")
    if not os.path.isfile(where):
        raise ValueError(f"{where} is not a readable safetensors file (not a regular file)")
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k.removeprefix(_WRAPPER_PREFIX): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{where} is not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{where} is not a bitcompile packed checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        layers = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: metadata 'layers' is not valid JSON ({err})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: metadata 'layers' must map module paths to layer descriptions")
    return tensors, {name.removeprefix(_WRAPPER_PREFIX): info for name, info in layers.items()}


def _check_layer(model: nn.Module, where: str, name: str, info, tensors: dict) -> _Layer:
    def bad(message: str):
        raise ValueError(f"{where}: packed layer {name!r}: {message}")

    module = _get_submodule(model, name)
    if not isinstance(module, (nn.Linear, PackedLinear)):
        bad("no such linear in the model" if module is None else f"the model has a {type(module).__name__} there")
    if not isinstance(info, dict):
        bad("its description is not a mapping")
    scheme, per_channel, k = info.get("scheme"), info.get("per_channel"), info.get("k")
    if scheme not in WEIGHT_SCHEMES:
        bad(f"unknown scheme {scheme!r} (supported: {', '.join(WEIGHT_SCHEMES)})")
    if not isinstance(per_channel, bool):
        bad(f"per_channel must be true or false, got {per_channel!r}")
    if isinstance(module, PackedLinear) and (module.config.weight, module.config.per_channel) != (scheme, per_channel):
        bad(
            f"{scheme} {'per-channel' if per_channel else 'per-tensor'} codes, the model's layer is packed as "
            f"{module.config.weight} {'per-channel' if module.config.per_channel else 'per-tensor'}"
        )
    n = module.out_features
    if k != module.in_features or info.get("n", n) != n:
        bad(f"{info.get('n', '?')}x{k} does not match the model's {n}x{module.in_features}")
    bits = info.get("activation_bits", 8)
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        bad(f"activation_bits must be an int in 2..8 or null, got {bits!r}")
    prefix = f"{name}." if name else ""
    packed, scale = tensors.get(f"{prefix}weight_packed"), tensors.get(f"{prefix}weight_scale")
    if packed is None or scale is None:
        bad("weight_packed or weight_scale is missing")
    want = (torch.int8, (n, k)) if scheme == "int8" else (torch.uint8, (n, packed_columns(k)))
    if (packed.dtype, tuple(packed.shape)) != want:
        bad(f"weight_packed is {packed.dtype} {list(packed.shape)}, expected {want[0]} {list(want[1])}")
    rows = n if per_channel else 1
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        bad(f"weight_scale is {scale.dtype} {list(scale.shape)}, expected torch.float32 [{rows}]")
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        bad("weight_scale holds values that are not finite and positive")
    if scheme == "int8":
        codes = packed
        if bool((codes == -128).any()):
            bad("int8 codes hold -128 (the symmetric range is -127..127)")
    else:
        try:
            codes = unpack_ternary(packed, k)
        except ValueError as err:
            bad(str(err))
        if scheme == "binary" and bool((codes == 0).any()):
            bad("binary codes hold zeros (only -1 and +1 are binary)")
    return _Layer(name, module, scheme, per_channel, bits, codes, packed, scale)


def _check_rest(model: nn.Module, where: str, tensors: dict, packed: list, deploy: bool) -> dict:
    """The file's other tensors against the model's state: the state to load, or ValueError."""
    expected = model.state_dict()
    for layer in packed:
        prefix = f"{layer.name}." if layer.name else ""
        for key in ("weight", "weight_packed", "weight_scale"):
            expected.pop(prefix + key, None)
        tensors = {k: v for k, v in tensors.items() if k not in (prefix + "weight_packed", prefix + "weight_scale")}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in tensors.items():
        mine = expected[key]
        if tuple(value.shape) != tuple(mine.shape):
            raise ValueError(f"{where}: {key!r} has shape {list(value.shape)}, the model's {list(mine.shape)}")
        if value.is_floating_point() != mine.is_floating_point() or (
            not mine.is_floating_point() and value.dtype != mine.dtype
        ):
            raise ValueError(f"{where}: {key!r} is {value.dtype}, the model's is {mine.dtype}")
    return dict(tensors)


def _get_submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
