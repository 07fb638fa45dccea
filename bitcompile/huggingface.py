"""transformers interop: its BitNet format to and from bitcompile models.

transformers' BitNet integration (``quantization_config`` with ``quant_method: "bitnet"``) turns
every ``nn.Linear`` of a model that ``modules_to_not_convert`` does not name into a ``BitLinear``
with two tensors: ``weight``, uint8 ``[N/4, K]`` holding four output rows per byte (row
``r + i*N/4`` in bits ``2i..2i+1``, stored as trit + 1), and ``weight_scale = 1 / s_w``. Its forward
is ``round(x * 127/amax) @ W_int^T / (127/amax * weight_scale)`` with per-token absmax ``amax``:
BitNet b1.58 with one scale per tensor and 8-bit activations, the backend's default.

``export_transformers`` writes a model (float, loaded with ``load_packed``, or deployed) as such a
directory; ``load_transformers`` reads one (or a model ``from_pretrained`` returned) back into a
plain float model whose latent weights quantize to the saved codes and scales, or, with
``deploy=True``, into one with ``PackedLinear`` layers. ``from_transformers_bitnet`` /
``to_transformers_bitnet`` convert one layer's tensors.

The two computations agree up to float32 rounding: bitcompile quantizes ``round(x / (amax/127))``
and multiplies by ``s_x * s_w``, transformers ``round(x * (127/amax))`` and divides, so a value
within rounding error of a .5 boundary can take the neighbouring code (about one activation in a
million on random data). See docs/huggingface.md for the tolerance this gives on the logits.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from bitcompile.checkpoint import PathLike, _set_submodule, quantized_layers, unwrap
from bitcompile.config import BitConfig
from bitcompile.nn.packed_linear import PackedLinear
from bitcompile.numerics import reference as ref
from bitcompile.numerics.packing import pack_ternary, packed_columns, unpack_ternary
from bitcompile.numerics.spec import check_int

QUANT_METHOD = "bitnet"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_HOLDS = (
    "transformers' BitNet format holds ternary weights with one scale per tensor and 8-bit per-token "
    "activations (weight='ternary', granularity='per_tensor', activation_bits=8, attention_bits=None, "
    "no custom weight quantizer)"
)


# --- one layer's tensors -------------------------------------------------------------------------


def _single_scale(name: str, scale) -> torch.Tensor:
    """``scale`` as a float32 ``[1]`` tensor; a ValueError unless it is one finite value > 0."""
    t = torch.as_tensor(scale)
    if t.numel() != 1:
        raise ValueError(
            f"{name} must be a single value (transformers' BitNet layout has one scale per tensor: "
            f"a per-channel scale does not convert), got {t.numel()} values"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a real number, got {t.dtype}")
    t = t.detach().float().reshape(1)
    if not (bool(torch.isfinite(t).all()) and float(t) > 0):
        raise ValueError(f"{name} must be finite and > 0, got {float(t)}")
    return t


def _reciprocal_scales(weight_scale: torch.Tensor) -> list[torch.Tensor]:
    """The float32 scales ``s`` (``[1]``) with ``1 / s == weight_scale`` in float32, nearest to
    ``1 / weight_scale`` first; ``[1 / weight_scale]`` where no float32 value has that reciprocal.

    A reciprocal of a reciprocal is not always the value itself (about one float32 in six), so
    ``1 / weight_scale`` alone would not always export back to the same ``weight_scale``."""
    ws = weight_scale.detach().float().reshape(1).cpu()
    first = 1.0 / ws
    bits = first.view(torch.int32)
    candidates = [(bits + step).view(torch.float32) for step in (0, -1, 1, -2, 2)]
    return [c for c in candidates if torch.equal(1.0 / c, ws)] or [first]


def _rows_to_trits(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """transformers' row-packed uint8 ``[ceil(N/4), K]`` -> int8 trits ``[N, K]`` (ValueError on code 3)."""
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        raise ValueError("transformers BitNet weight contains the invalid code 3")
    return codes.to(torch.int8) - 1


def _check_rows(packed, out_features: int) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        what = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(
            f"packed (transformers' weight) must be a 2-D uint8 tensor [ceil(out_features / 4), "
            f"in_features], got {what}"
        )
    check_int("out_features", out_features, 0)
    rows = packed.shape[0]
    if not 4 * (rows - 1) < out_features <= 4 * rows:
        valid = f"{4 * (rows - 1) + 1}..{4 * rows}" if rows else "0"
        raise ValueError(
            f"out_features={out_features} does not fit a weight of {rows} packed rows "
            f"(four rows per byte): valid out_features {valid}"
        )


def from_transformers_bitnet(
    packed: torch.Tensor, weight_scale: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' BitNet ``(weight uint8 [ceil(N/4), K], weight_scale)`` -> canonical
    ``(uint8 [N, ceil(K/4)], float32 s_w [1])``, ``s_w`` the float32 value whose reciprocal is
    ``weight_scale`` where one exists (so :func:`to_transformers_bitnet` gives it back), else
    ``1 / weight_scale``.

    Raises ``ValueError`` naming the problem if ``packed`` is not 2-D uint8, ``out_features`` is
    not in ``4 * (rows - 1) + 1 .. 4 * rows`` for its ``rows``, ``weight_scale`` is not one finite
    value > 0, or a code is the invalid 3."""
    _check_rows(packed, out_features)
    scale = _single_scale("weight_scale", weight_scale)
    trits = _rows_to_trits(packed, out_features)
    return pack_ternary(trits), _reciprocal_scales(scale)[0].to(packed.device)


def to_transformers_bitnet(
    packed: torch.Tensor, scale: torch.Tensor, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``(packed, s_w [1])`` -> transformers' BitNet ``(weight, weight_scale)``.

    Raises ``ValueError`` naming the problem if ``packed`` is not 2-D uint8 with
    ``ceil(in_features / 4)`` columns, ``scale`` is not one finite value > 0 (transformers' layout
    has one scale per tensor), or a code is the invalid 3."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        what = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a 2-D uint8 tensor [out_features, ceil(in_features / 4)], got {what}")
    check_int("in_features", in_features, 0)
    if packed.shape[1] != packed_columns(in_features):
        raise ValueError(
            f"in_features={in_features} needs {packed_columns(in_features)} packed columns, "
            f"packed has {packed.shape[1]}"
        )
    s = _single_scale("scale", scale)
    trits = unpack_ternary(packed, in_features)  # checks for the invalid code 3
    n = trits.shape[0]
    rows = (n + 3) // 4
    codes = torch.nn.functional.pad(trits + 1, (0, 0, 0, 4 * rows - n), value=1).to(torch.uint8)
    out = torch.zeros(rows, in_features, dtype=torch.uint8, device=packed.device)
    for i in range(4):
        out |= codes[i * rows : (i + 1) * rows] << (2 * i)
    return out, (1.0 / s).to(packed.device)


# --- export --------------------------------------------------------------------------------------


def export_transformers(model: nn.Module, directory: PathLike, **options) -> dict[str, str]:
    """Write ``model`` as a directory that ``transformers``' own ``from_pretrained`` loads with
    its BitNet ``BitLinear`` layers (``config.json`` with ``quantization_config``,
    ``model.safetensors``, ``generation_config.json`` if the model has one). Returns
    ``{module path: "ternary"}`` of the layers written as ``BitLinear``.

    ``model``: a transformers model (or its ``torch.compile`` wrapper): float (its linears are
    quantized as the backend would under ``options``), loaded with ``load_packed`` (either mode) or
    deployed (its ``PackedLinear`` layers are written as they are). Every other ``nn.Linear``
    (``lm_head``, excluded or tied layers) is listed in ``modules_to_not_convert`` and stays float.
    The model and its config are not changed. Raises ``ValueError`` if the options or a layer do not
    fit the format (ternary, one scale per tensor, 8-bit activations, ``out_features`` a multiple
    of 4, linears only)."""
    from safetensors.torch import save_file

    model = unwrap(model)
    config = _export_config(model, options)
    layers = _export_layers(model, config)
    skip = _modules_to_not_convert(model, layers)
    _check_transformers_converts(model, layers, skip)
    tensors = _export_tensors(model, layers)

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, INDEX_FILE)):
        raise ValueError(
            f"{directory} holds a sharded checkpoint ({INDEX_FILE}), which from_pretrained would load "
            f"instead of the exported {WEIGHTS_FILE}: export to an empty directory"
        )
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    _bitnet_config(model, skip).save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(directory)
    return {name: "ternary" for name in layers}


def _export_config(model: nn.Module, options: dict) -> BitConfig:
    """The backend options, checked against the format and the model."""
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise TypeError(f"export_transformers takes a transformers model (PreTrainedModel), got {type(model).__name__}")
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else existing.quant_method
        raise ValueError(
            f"the model is already quantized by transformers (quant_method {str(method)!r}); "
            "bitcompile.load_transformers(model) turns a BitNet one into a float model to export"
        )
    config = BitConfig.from_options(options)
    if (config.weight, config.per_channel, config.activation_bits, config.attention_bits, config.weight_quantizer) != (
        "ternary",
        False,
        8,
        None,
        None,
    ):
        raise ValueError(
            f"{FORMAT_HOLDS}; got weight={config.weight!r}, "
            f"granularity={'per_channel' if config.per_channel else 'per_tensor'!r}, "
            f"activation_bits={config.activation_bits!r}, attention_bits={config.attention_bits!r}"
            + (", a custom weight quantizer" if config.weight_quantizer is not None else "")
        )
    return config


def _export_layers(model: nn.Module, config: BitConfig) -> dict[str, nn.Module]:
    """``{path: module}`` of the layers to write as ``BitLinear``; ValueError for what the format
    cannot hold."""
    unsupported = _other_quantized_layers(model, config)
    if unsupported:
        raise ValueError(
            f"transformers' BitNet format converts nn.Linear layers only, and the backend would also "
            f"quantize {unsupported[:8]}: pass exclude=[...] naming them to export them in float"
        )
    layers = dict(quantized_layers(model, config))
    for name, module in layers.items():
        if isinstance(module, PackedLinear):
            cfg = module.config
            if (cfg.weight, cfg.per_channel, cfg.activation_bits) != ("ternary", False, 8):
                raise ValueError(
                    f"{FORMAT_HOLDS}; the deployed layer {name!r} holds {cfg.weight} "
                    f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights with "
                    f"activation_bits={cfg.activation_bits!r}"
                )
        if module.out_features % 4:
            raise ValueError(
                f"layer {name!r} has out_features={module.out_features}: transformers' BitLinear packs "
                f"four output rows per byte and needs a multiple of 4; exclude it to export it in float"
            )
    return layers


def _other_quantized_layers(model: nn.Module, config: BitConfig) -> list[str]:
    """Paths of non-``nn.Linear`` layers the backend quantizes under ``config`` (GPT-2 ``Conv1D``,
    convolutions, ``nn.MultiheadAttention``): transformers' BitNet layers cannot hold them."""
    kinds: tuple = (nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:
        pass
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or config.excluded(name):
            continue
        conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        depthwise = conv and module.groups > 1 and module.groups == module.in_channels
        if not (depthwise and not config.quantize_depthwise):
            found.append(name)
    return found


def _modules_to_not_convert(model: nn.Module, layers: dict) -> list[str]:
    """Every ``nn.Linear`` path (subclasses too: transformers converts those) left in float."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in layers]


def _check_transformers_converts(model: nn.Module, layers: dict, skip: list[str]) -> None:
    """ValueError unless transformers' own rule (``modules_to_not_convert`` plus the class's
    ``_keep_in_fp32_modules``, matched as ``from_pretrained`` matches them) converts exactly ``layers``."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = HfQuantizer.get_modules_to_not_convert(model, list(skip), getattr(model, "_keep_in_fp32_modules", None))
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, PackedLinear)):
            continue
        converts = should_convert_module(name, patterns)
        if converts != (name in layers):
            what = "would stay float in transformers" if name in layers else "would be converted by transformers"
            raise ValueError(
                f"layer {name!r} {what} (modules_to_not_convert and the model's _keep_in_fp32_modules "
                f"match module paths by prefix and suffix); exclude or rename it to export this model"
            )


def _export_tensors(model: nn.Module, layers: dict) -> dict[str, torch.Tensor]:
    """The state dict with each layer's weight as transformers' ``weight`` / ``weight_scale``, a
    tied output embedding left to transformers to re-tie, other shared tensors copied."""
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in layers.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, PackedLinear):
            packed, scale = module.weight_packed, module.weight_scale
            del tensors[f"{prefix}weight_packed"]
        else:
            packed, scale = ref.quantize_weights(module.weight.detach(), "ternary", False)
        tensors[f"{prefix}weight"], tensors[f"{prefix}weight_scale"] = to_transformers_bitnet(
            packed, scale, module.in_features
        )
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {tied key: the key it follows}
    first, out = {}, {}  # storage -> the first key written from it
    for key, value in tensors.items():
        value = value.cpu()
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        if storage is not None and storage in first:
            if tied.get(key) == first[storage]:
                continue  # from_pretrained ties it again
            value = value.clone()  # safetensors stores no shared memory
        elif storage is not None:
            first[storage] = key
        out[key] = value.contiguous()
    return out


def _bitnet_config(model: nn.Module, skip: list[str]):
    """A copy of the model's config with ``quantization_config`` and the model's float dtype."""
    from transformers import BitNetQuantConfig

    config = copy.deepcopy(model.config)
    config.quantization_config = BitNetQuantConfig(
        modules_to_not_convert=list(skip), linear_class="bitlinear", quantization_mode="offline"
    )
    config.architectures = [type(model).__name__]
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats:
        config.dtype = floats[0]
    return config


# --- import --------------------------------------------------------------------------------------


def load_transformers(source: Union[PathLike, nn.Module], *, deploy: bool = False) -> nn.Module:
    """A plain transformers model from transformers' BitNet format.

    ``source``: a directory in that format (``config.json`` with a ``bitnet``
    ``quantization_config``, safetensors weights: written by :func:`export_transformers` or a
    BitNet checkpoint on disk), or a model ``from_pretrained`` returned with BitNet layers. The
    result is built from the config without ``quantization_config`` (the same class, ``nn.Linear``
    layers, ``eval`` mode as ``from_pretrained`` leaves it, on the source model's device): each
    BitNet layer gets latent float weights that the backend quantizes back to its codes and scale
    (``reference.latent_weights``; the scale bitwise where a float32 weight can reach it), so the
    model trains (QAT) and infers through ``bitcompile.compile`` as the BitNet model does. With
    ``deploy=True`` those layers are ``PackedLinear`` instead (inference only, least memory).

    Everything is checked before the result is filled: a config that is not BitNet, a missing,
    unexpected or misshapen tensor raise ``ValueError`` naming the file and the entry."""
    if not isinstance(deploy, bool):
        raise TypeError(f"deploy must be True or False, got {deploy!r}")
    if isinstance(source, nn.Module):
        src = _from_model(unwrap(source))
    else:
        src = _from_directory(os.fspath(source))
    settings = _bitnet_settings(src.config, src.config_file)
    model = _float_model(src.config, src.cls)
    layers = [_import_layer(model, name, src, settings) for name in _bitnet_layers(model, settings)]
    tied, own = _check_rest(model, src, layers)

    converted = {key for layer in layers for key in layer.keys}
    state = {key: value for key, value in src.tensors.items() if key not in converted}
    state.update({key: state[source_key] for key, source_key in tied.items()})
    state.update({key: value.detach().clone() for key, value in model.state_dict().items() if key in own})
    for layer in layers:
        _install_layer(model, layer, state, deploy)
    model.load_state_dict(state, strict=True)
    if src.generation is not None:
        model.generation_config = src.generation
    return model.to(src.device).eval()


@dataclass
class _Source:
    config: object
    tensors: dict  # name -> tensor
    files: dict  # name -> the file holding it
    weights_file: str  # where a missing entry was looked for
    config_file: str
    cls: Optional[type] = None
    device: torch.device = torch.device("cpu")
    generation: object = None

    def where(self, key: str) -> str:
        return self.files.get(key, self.weights_file)


def _from_model(source: nn.Module) -> _Source:
    """The tensors and config of a model ``from_pretrained`` returned."""
    config = getattr(source, "config", None)
    if config is None or not callable(getattr(source, "save_pretrained", None)):
        raise TypeError(f"load_transformers takes a directory or a transformers model, got {type(source).__name__}")
    where = f"the given {type(source).__name__}"
    tensors = {k: v.detach() for k, v in source.state_dict().items()}
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    return _Source(
        config,
        tensors,
        {},
        where,
        f"{where}'s config",
        type(source),
        device,
        copy.deepcopy(getattr(source, "generation_config", None)),
    )


def _from_directory(directory: str) -> _Source:
    """The tensors (and the file holding each) and config of a BitNet checkpoint directory."""
    from transformers import AutoConfig, GenerationConfig

    if not os.path.exists(directory):
        raise FileNotFoundError(f"no transformers checkpoint at {directory}")
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{directory} is not a transformers checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{config_file} is not a readable transformers config ({err})") from None
    _bitnet_settings(config, config_file)  # a float checkpoint fails here, before its weights are read
    tensors, files, weights_file = _read_weights(directory)
    generation = None
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(directory, local_files_only=True)
    return _Source(config, tensors, files, weights_file, config_file, generation=generation)


def _read_weights(directory: str) -> tuple[dict, dict, str]:
    """Every tensor of ``model.safetensors`` or of the shards an index names, the file holding
    each, and the file (or index) read."""
    from safetensors import SafetensorError, safe_open

    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        paths, weights_file = [single], single
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            paths, weights_file = [os.path.join(directory, n) for n in sorted(set(weight_map.values()))], index
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a readable safetensors index ({err!r})") from None
    else:
        raise ValueError(
            f"{directory} has no {WEIGHTS_FILE} or {INDEX_FILE} (load_transformers reads safetensors checkpoints)"
        )
    tensors, files = {}, {}
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key], files[key] = f.get_tensor(key), path
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return tensors, files, weights_file


def _bitnet_settings(config, where: str) -> dict:
    """The checked ``quantization_config`` as a dict; ValueError if it is not a BitNet one that
    converts to a float architecture."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(
            f"{where}: no quantization_config: not a transformers BitNet checkpoint (a float model "
            f"loads with from_pretrained and compiles with bitcompile.compile as it is)"
        )
    settings = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    method = settings.get("quant_method")
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum, or its value
    if method.lower() != QUANT_METHOD:
        raise ValueError(f"{where}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
    settings["linear_class"] = settings.get("linear_class") or "bitlinear"
    settings["quantization_mode"] = settings.get("quantization_mode") or "offline"
    for key, valid in (("linear_class", ("bitlinear", "autobitlinear")), ("quantization_mode", ("offline", "online"))):
        if settings[key] not in valid:
            raise ValueError(f"{where}: quantization_config.{key} {settings[key]!r} is not one of {list(valid)}")
    if settings.get("use_rms_norm"):
        raise ValueError(
            f"{where}: quantization_config.use_rms_norm adds an RMSNorm inside each BitNet layer, "
            f"which the float architecture does not have"
        )
    return settings


def _float_model(config, cls: Optional[type] = None) -> nn.Module:
    """The architecture of ``config`` (``cls``, else its ``architectures`` entry, else a causal LM)
    without ``quantization_config``, in the config's dtype."""
    import transformers

    config = copy.deepcopy(config)
    for name in ("quantization_config", "_is_quantized", "_pre_quantized"):
        if name in config.__dict__:
            delattr(config, name)
    if cls is None:
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        return transformers.AutoModelForCausalLM.from_config(config)
    return cls._from_config(config)


def _bitnet_layers(model: nn.Module, settings: dict) -> list[str]:
    """The linears transformers converts under ``settings`` (its own rule and helpers); none when
    the weights are float (``autobitlinear`` quantizing online)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    if settings["linear_class"] == "autobitlinear" and settings["quantization_mode"] == "online":
        return []
    patterns = HfQuantizer.get_modules_to_not_convert(
        model, settings.get("modules_to_not_convert"), getattr(model, "_keep_in_fp32_modules", None)
    )
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, patterns)
    ]


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    trits: torch.Tensor  # int8 [N, K]
    scales: list  # float32 [1] candidates for s_w, preferred first
    keys: list  # the entries it replaces: weight and weight_scale


def _import_layer(model: nn.Module, name: str, src: _Source, settings: dict) -> _Layer:
    """One BitNet layer's trits and candidate scales, checked; ValueError naming file and entry."""
    module = model.get_submodule(name)
    n, k = module.out_features, module.in_features
    weight_key, scale_key = f"{name}.weight", f"{name}.weight_scale"
    weight, weight_scale = src.tensors.get(weight_key), src.tensors.get(scale_key)

    def bad(key: str, message: str):
        raise ValueError(f"{src.where(key)}: BitNet layer {name!r}: {key!r} {message}")

    if weight is None:
        bad(weight_key, "is missing")
    if weight_scale is None:
        bad(scale_key, "is missing")
    try:
        scale = _single_scale("weight_scale", weight_scale)
    except ValueError as err:
        bad(scale_key, f"is not a usable scale: {err}")
    packed_shape = [n // 4, k]
    autobit = settings["linear_class"] == "autobitlinear"
    if weight.dtype == torch.uint8:
        if n % 4 or list(weight.shape) != packed_shape:
            bad(
                weight_key,
                f"is uint8 {list(weight.shape)}, expected uint8 {packed_shape} for a {n}x{k} layer "
                f"(four output rows per byte, out_features a multiple of 4)",
            )
        try:
            trits = _rows_to_trits(weight, n)
        except ValueError as err:
            bad(weight_key, str(err))
    elif autobit and weight.is_floating_point() and list(weight.shape) == [n, k]:
        if not bool(((weight == -1) | (weight == 0) | (weight == 1)).all()):
            bad(weight_key, "holds values other than -1, 0, 1 (an offline autobitlinear weight is ternary)")
        trits = weight.to(torch.int8)
    else:
        bad(
            weight_key,
            f"is {weight.dtype} {list(weight.shape)}, expected uint8 {packed_shape}"
            + (f" or ternary floats {[n, k]}" if autobit else ""),
        )
    # BitLinear divides by weight_scale (= 1/s_w); offline AutoBitLinear multiplies by it (= s_w).
    scales = [scale] if autobit else _reciprocal_scales(scale)
    return _Layer(name, module, trits.cpu(), scales, [weight_key, scale_key])


def _check_rest(model: nn.Module, src: _Source, layers: list) -> tuple[dict[str, str], set[str]]:
    """Every other entry against the float model: a missing parameter (unless tied to a present
    one), an unexpected or misshapen entry is a ValueError naming the file and the entry. Returns
    ``{missing key: present key}`` of the tied ones and the missing buffers, which keep the
    model's own values (as ``from_pretrained`` keeps them)."""
    expected = model.state_dict(keep_vars=True)
    buffers = {id(b) for b in model.buffers()}
    consumed = {key for layer in layers for key in layer.keys}
    for layer in layers:
        expected.pop(f"{layer.name}.weight")
    present = {id(value): key for key, value in expected.items() if key in src.tensors}
    tied = {
        key: present[id(value)] for key, value in expected.items() if key not in src.tensors and id(value) in present
    }
    own = {key for key, value in expected.items() if key not in src.tensors and id(value) in buffers}
    missing = [key for key in expected if key not in src.tensors and key not in tied and key not in own]
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [
        key
        for key in src.tensors
        if key not in expected and key not in consumed and not any(re.search(pattern, key) for pattern in ignored)
    ]
    if missing:
        raise ValueError(
            f"{src.weights_file}: missing entries {missing[:8]}"
            + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if unexpected:
        raise ValueError(f"{src.where(unexpected[0])}: entries the model does not have: {unexpected[:8]}")
    for key, mine in expected.items():
        value = src.tensors.get(key)
        if value is None:
            continue
        if tuple(value.shape) != tuple(mine.shape):
            raise ValueError(f"{src.where(key)}: {key!r} has shape {list(value.shape)}, the model's {list(mine.shape)}")
        if value.is_floating_point() != mine.is_floating_point():
            raise ValueError(f"{src.where(key)}: {key!r} is {value.dtype}, the model's is {mine.dtype}")
    return tied, own


def _install_layer(model: nn.Module, layer: _Layer, state: dict, deploy: bool) -> None:
    """Put one BitNet layer's weights into ``state`` (as a ``PackedLinear`` with ``deploy``)."""
    module, prefix = layer.module, f"{layer.name}."
    if deploy:
        _set_submodule(
            model,
            layer.name,
            PackedLinear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                device=module.weight.device,
                dtype=module.weight.dtype,
            ),
        )
        state[prefix + "weight_packed"], state[prefix + "weight_scale"] = pack_ternary(layer.trits), layer.scales[0]
    else:
        state[prefix + "weight"] = _exact_latent_weights(layer.trits, layer.scales, module.weight.dtype)


# --- latent weights that hit the scale -----------------------------------------------------------


def _exact_latent_weights(trits: torch.Tensor, scales: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Latent weights ``[N, K]`` whose per-tensor absmean quantization gives ``trits`` and one of
    ``scales`` (the float32 values whose reciprocal is the file's ``weight_scale``, preferred
    first): ``reference.latent_weights`` for each until one comes back bitwise, else the first."""
    first = None
    for scale in scales:
        w = ref.latent_weights(trits, scale, "ternary", False, dtype)
        if torch.equal(ref.weight_scale(w, "ternary", False), scale.reshape(1)):
            return w
        first = w if first is None else first
    return first
