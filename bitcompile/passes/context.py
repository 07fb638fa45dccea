"""What a pass receives besides the graph: the options, the graph's kind, the report it
writes to, and what it asks the runtime wrapper to feed the compiled graph."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def fetch(self, inputs) -> tuple:
        """``(packed, scale)`` for this call's graph inputs, from the weight cache."""
        from bitcompile.ops import WEIGHT_CACHE

        if self.members:
            return WEIGHT_CACHE.get_group([inputs[i] for i in self.members], self.scheme, self.per_channel, self.layout)
        return WEIGHT_CACHE.get(inputs[self.arg_index], self.scheme, self.per_channel, self.layout, self.view)


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
