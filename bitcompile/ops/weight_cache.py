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

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from bitcompile.numerics.reference import interleave_rows


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class WeightCache:
    def __init__(self):
        self._entries = WeakIdKeyDictionary()
        self.stats = CacheStats()
        # Bumped whenever an entry is stored (``put``, a checkpoint's or a miss's) or the cache is
        # cleared: callers that remember what they were served (``passes.context.ServedWeights``)
        # look again then.
        self.generation = 0

    def get(
        self, weight: torch.Tensor, scheme: str, per_channel: bool, layout: str = "canonical", view: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, scale)`` of ``weight``, or of ``weight.flatten(1)`` (``view="flatten"``, a
        conv) or ``weight.t()`` (``view="t"``); ``layout="kblocked"``: ternary codes in the
        kernels' K-blocked layout (relaid once per packed tensor), for ``bitnet::linear_q_triton``."""
        if weight.is_inference():
            self.stats.misses += 1
            packed = torch.ops.bitnet.quantize_weights(_VIEWS[view](weight), scheme, per_channel)
        else:
            key = (scheme, per_channel, view)
            entry = self._entries.get(weight, {}).get(key)
            if entry is not None and entry[0] == _version_key(weight):
                self.stats.hits += 1
                packed = entry[1]
            else:
                self.stats.misses += 1
                with torch.no_grad():
                    packed = torch.ops.bitnet.quantize_weights(_VIEWS[view](weight.detach()), scheme, per_channel)
                self.put(weight, scheme, per_channel, packed, view)
        if layout == "kblocked":
            k = weight.shape[0] if view == "t" else math.prod(weight.shape[1:])
            return _kblocked(packed[0], k), packed[1]
        return packed

    def get_group(
        self,
        weights: Sequence[torch.Tensor],
        scheme: str,
        per_channel: bool,
        layout: str = "canonical",
        interleave: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, scale)`` of ``weights`` stacked along the output rows (sibling linears fused into
        one matmul): the members' packed codes concatenated, and one float32 scale per row (each
        member's scale over its rows), kept until a member changes. ``interleave``: two members'
        rows alternated instead (``reference.interleave_rows``)."""
        first = weights[0]
        key = ("group", scheme, per_channel, interleave, tuple(id(w) for w in weights))
        versions = tuple(_version_key(w) for w in weights)
        entry = None if any(w.is_inference() for w in weights) else self._entries.get(first, {}).get(key)
        if entry is not None and entry[0] == versions:
            self.stats.hits += 1
            packed = entry[1]
        else:
            parts = [self.get(w, scheme, per_channel) for w in weights]
            scales = [s.expand(w.shape[0]) if s.numel() == 1 else s for w, (_, s) in zip(weights, parts)]
            packed = _stack([p for p, _ in parts], scales, interleave)
            if not any(w.is_inference() for w in weights):
                self._entries.setdefault(first, {})[key] = (versions, packed)
        if layout == "kblocked":
            return _kblocked(packed[0], first.shape[1]), packed[1]
        return packed

    def get_prepacked(
        self,
        codes: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor],
        k: int,
        layout: str = "canonical",
        interleave: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, scale)`` of deployed layers' 2-bit ``codes`` and ``scales``: one layer's as they
        are, several (sibling linears) stacked along the output rows with one scale per row (or two
        alternated, ``interleave``), kept until a member changes; ``layout="kblocked"`` as for
        :meth:`get`."""
        if len(codes) == 1:
            packed = codes[0], scales[0]
        else:
            tensors = (*codes, *scales)
            key = ("prepacked group", interleave, tuple(id(t) for t in tensors))
            versions = tuple(_version_key(t) for t in tensors)
            cached = not any(t.is_inference() for t in tensors)
            entry = self._entries.get(codes[0], {}).get(key) if cached else None
            if entry is not None and entry[0] == versions:
                self.stats.hits += 1
                packed = entry[1]
            else:
                self.stats.misses += 1
                rows = [s.float().expand(c.shape[0]) if s.numel() == 1 else s.float() for c, s in zip(codes, scales)]
                packed = _stack(codes, rows, interleave)
                if cached:
                    self._entries.setdefault(codes[0], {})[key] = (versions, packed)
        if layout == "kblocked":
            return _kblocked(packed[0], k), packed[1]
        return packed

    def put(
        self,
        weight: torch.Tensor,
        scheme: str,
        per_channel: bool,
        packed: tuple[torch.Tensor, torch.Tensor],
        view: str = "",
    ) -> None:
        """Serve ``packed`` for ``weight`` (seen through ``view``) until it changes (also used
        when loading packed checkpoints)."""
        self._entries.setdefault(weight, {})[(scheme, per_channel, view)] = (_version_key(weight), packed)
        self.generation += 1

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()
        self.stats = CacheStats()
        self.generation += 1


WEIGHT_CACHE = WeightCache()
_VIEWS = {"": lambda w: w, "flatten": lambda w: w.flatten(1), "t": lambda w: w.t()}


def _stack(codes: Sequence[torch.Tensor], scales: Sequence[torch.Tensor], interleave: bool) -> tuple:
    """Members' packed rows and per-row scales, stacked or (two members) alternated."""
    if interleave:
        return interleave_rows(*codes), interleave_rows(*scales).contiguous()
    return torch.cat(codes), torch.cat(scales).contiguous()


def _kblocked(packed: torch.Tensor, k: int) -> torch.Tensor:
    if packed.is_cuda:
        from bitcompile.kernels.layout import kblocked

        return kblocked(packed, k)
    from bitcompile.numerics.packing import to_kblocked

    return to_kblocked(packed, k)


def _version_key(weight: torch.Tensor):
    return weight._version, weight.data_ptr(), weight.device
