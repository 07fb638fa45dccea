"""What a pass receives besides the graph: the options, the graph's kind, the report it
writes to, and what it asks the runtime wrapper to feed the compiled graph."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from bitcompile.config import BitConfig
from bitcompile.report import Report


@dataclass
class HoistedWeight:
    """An inference-graph input fed from the packed-weight cache at call time."""

    arg_index: int  # position of the latent weight among the graph's inputs
    scheme: str
    per_channel: bool
    packed_name: str = ""  # the placeholders of the packed weights and of their scale
    scale_name: str = ""
    layout: str = "canonical"  # or "kblocked" (passes.lower_triton)
    view: str = ""  # quantize W itself, or W.flatten(1) ("flatten"), or W.t() ("t")
    members: tuple[int, ...] = ()  # sibling linears fused into one matmul: their weights' positions
    # Deployed layers' weights, already packed (2-bit codes): the inputs at ``arg_index`` /
    # ``members`` are codes, these are the positions of their scales, and ``k`` their column count.
    scale_indices: tuple[int, ...] = ()
    k: int = 0
    interleave: bool = False  # two members' rows alternated (a swiglu epilogue), not stacked

    def sources(self) -> tuple[int, ...]:
        """Positions of the graph inputs this entry is computed from."""
        return (*(self.members or (self.arg_index,)), *self.scale_indices)

    def fetch(self, inputs) -> tuple:
        """``(packed, scale)`` for this call's graph inputs, from the weight cache.

        Dynamo's DDP optimizer compiles each piece of a split graph and runs it on fake inputs to
        propagate shapes: fake weights get the packing of zero stand-ins of their shapes, as fakes
        of their mode (metadata only; a fake has no data to pack)."""
        weights = [inputs[i] for i in self.members] if self.members else [inputs[self.arg_index]]
        weights += [inputs[i] for i in self.scale_indices]
        fake = next((w for w in weights if isinstance(w, FakeTensor)), None)
        if fake is None:
            return self._packed(weights)
        with unset_fake_temporarily():
            packed = self._packed([torch.zeros(w.shape, dtype=w.dtype, device=w.device) for w in weights])
        return tuple(fake.fake_mode.from_tensor(t, static_shapes=True) for t in packed)

    def _packed(self, weights: list) -> tuple:
        from bitcompile.ops import WEIGHT_CACHE

        if self.scale_indices:
            half = len(weights) // 2
            return WEIGHT_CACHE.get_prepacked(weights[:half], weights[half:], self.k, self.layout, self.interleave)
        if self.members:
            return WEIGHT_CACHE.get_group(weights, self.scheme, self.per_channel, self.layout, self.interleave)
        return WEIGHT_CACHE.get(weights[0], self.scheme, self.per_channel, self.layout, self.view)


class ServedWeights:
    """The hoisted inputs of one compiled graph, for each call: what the weight cache serves,
    looked up again only when the cache stored or dropped entries since, or a source input is
    another tensor, was updated in place (its version) or got new storage (``.data = ...``). One
    check of identity, version and address per source instead of a cache lookup per weight (a
    16-layer deployed Llama: 224 sources; the lookups cost its decode step 270 us of host time
    per call, the check ~55 us, done by ``map`` over the sources rather than a Python loop)."""

    def __init__(self, hoisted: list[HoistedWeight]):
        self.hoisted = hoisted
        indices = sorted({i for h in hoisted for i in h.sources()})
        self._pick = picker(indices)
        self._seen: tuple = ()  # the sources, their versions, their addresses
        self._served: list = []
        self._generation = -1

    def __call__(self, inputs) -> list:
        from bitcompile.ops import WEIGHT_CACHE

        sources = self._pick(inputs)
        if self._seen and self._generation == WEIGHT_CACHE.generation:
            tensors, versions, addresses = self._seen
            if (
                all(map(operator.is_, sources, tensors))
                and list(map(_VERSION, sources)) == versions
                and _same_addresses(sources, addresses)
            ):
                return self._served
        served = [t for h in self.hoisted for t in h.fetch(inputs)]
        self._seen = ()
        # Inference tensors have no version to check, fakes and storage-less subclasses no
        # address: looked up on every call.
        if all(type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_inference() for t in sources):
            self._seen = sources, list(map(_VERSION, sources)), list(map(torch.Tensor.data_ptr, sources))
            self._served, self._generation = served, WEIGHT_CACHE.generation
        return served


_VERSION = operator.attrgetter("_version")


def _same_addresses(tensors: tuple, addresses: list) -> bool:
    # CUDA builds compare the addresses in C++ (the check CUDA graph trees make of static inputs)
    same = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    if same is None:
        return list(map(torch.Tensor.data_ptr, tensors)) == addresses
    return same(list(tensors), addresses, list(range(len(addresses))))


def picker(positions: list[int]) -> Callable:
    """``args -> tuple of the args at positions``, as cheap as it gets per call."""
    if len(positions) == 1:
        return lambda args: (args[positions[0]],)
    return operator.itemgetter(*positions) if positions else lambda args: ()


@dataclass
class PassContext:
    config: BitConfig
    training: bool  # grads needed: weights are re-quantized in the graph on every call
    graph_index: int = 0
    report: Report = field(default_factory=Report)
    hoisted: list[HoistedWeight] = field(default_factory=list)
    # Callables returning tensors the runtime wrapper appends to every call, after the
    # original inputs and before the hoisted weights (e.g. a custom quantizer's parameters).
    runtime_inputs: list = field(default_factory=list)
