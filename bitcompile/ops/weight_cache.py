"""Packed weights for inference, quantized once and reused until the parameter changes.

A parameter changes through in-place updates (optimizer steps, ``load_state_dict``'s
``copy_``), which bump its version counter, or through reassignment of ``.data``,
which changes its storage. The cache keys on both, so it never serves stale
weights after either. Mutations made through ``param.data.<op>_()`` bypass the
version counter: call :meth:`WeightCache.clear` after those. Inference tensors
(created under ``torch.inference_mode``) have no version counter, so they are
re-quantized on every call rather than risk serving stale weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class WeightCache:
    def __init__(self):
        self._entries = WeakIdKeyDictionary()
        self.stats = CacheStats()

    def get(self, weight: torch.Tensor, scheme: str, per_channel: bool, layout: str = "canonical") -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, scale)``; ``layout="kblocked"``: ternary codes in the kernels' K-blocked
        layout (relaid once per packed tensor), for ``bitnet::linear_q_triton``."""
        packed, scale = self._canonical(weight, scheme, per_channel)
        if layout == "kblocked":
            packed = _kblocked(packed, weight.shape[-1])
        return packed, scale

    def _canonical(self, weight: torch.Tensor, scheme: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.is_inference():
            self.stats.misses += 1
            return torch.ops.bitnet.quantize_weights(weight, scheme, per_channel)
        entry = self._entries.get(weight, {}).get((scheme, per_channel))
        if entry is not None and entry[0] == _version_key(weight):
            self.stats.hits += 1
            return entry[1]
        self.stats.misses += 1
        with torch.no_grad():
            packed = torch.ops.bitnet.quantize_weights(weight.detach(), scheme, per_channel)
        self.put(weight, scheme, per_channel, packed)
        return packed

    def put(self, weight: torch.Tensor, scheme: str, per_channel: bool, packed: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Serve ``packed`` for ``weight`` until it changes (used when loading packed checkpoints)."""
        self._entries.setdefault(weight, {})[(scheme, per_channel)] = (_version_key(weight), packed)

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()
        self.stats = CacheStats()


WEIGHT_CACHE = WeightCache()


def _kblocked(packed: torch.Tensor, k: int) -> torch.Tensor:
    if packed.is_cuda:
        from bitcompile.kernels.layout import kblocked

        return kblocked(packed, k)
    from bitcompile.quant.packing import to_kblocked

    return to_kblocked(packed, k)


def _version_key(weight: torch.Tensor):
    return weight._version, weight.data_ptr(), weight.device
