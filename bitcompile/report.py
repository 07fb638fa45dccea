"""What the backend did: every candidate op, rewritten or skipped and why, in every graph a compile produced.

One compile (one ``torch.compile`` call, or one ``bitcompile.compile(model)``) can produce many graphs:
recompiles (training and eval, new shapes), ``generate``'s prefill and decode steps, the pieces
Dynamo's DDP optimizer splits a model into, the graphs around a graph break. Its :class:`Report`
accumulates all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn


@dataclass
class Candidate:
    graph: int
    op: str  # "linear", "conv2d", ...
    module: str  # module path of the layer, e.g. "encoder.fc1"
    shape: str  # "x[2, 8] @ W[4, 8]^T"
    dtype: str
    rewritten: bool
    reason: str = ""  # why it was skipped, or what it became
    weight_bits: int = 0  # bits per stored weight once rewritten (2 for packed ternary/binary)

    @property
    def status(self) -> str:
        return "rewritten" if self.rewritten else "skipped"


@dataclass
class GraphSummary:
    """One compiled graph: its index in the report, its kind and its counts."""

    index: int
    kind: str  # "training" (weights re-quantized every call, STE backward) or "inference" (packed weights)
    rewritten: int
    skipped: int
    fallback: bool = False  # a pass raised and the graph was compiled unmodified


@dataclass
class Layer:
    """One candidate op of the model, however many graphs it appears in."""

    module: str
    op: str
    graphs: list[int]
    rewritten_in: list[int]  # the graphs in which it was rewritten
    shapes: list[str]  # distinct, in order of appearance
    dtype: str
    notes: list[tuple[str, list[int]]] = field(default_factory=list)  # distinct notes and their graphs

    @property
    def status(self) -> str:
        if len(self.rewritten_in) == len(self.graphs):
            return "rewritten"
        return "skipped" if not self.rewritten_in else "partly"

    @property
    def note(self) -> str:
        """The note, or each graph range's where they differ (``0: ... | 1-3: ...``)."""
        if len(self.notes) == 1:
            return self.notes[0][0]
        return " | ".join(f"{_ranges(graphs)}: {text}" for text, graphs in self.notes)

    def add_note(self, text: str, graph: int) -> None:
        """Record ``text`` for ``graph``. A note that adds to another (``..., A8`` and ``..., A8,
        epilogue: silu``: the epilogue is fused in inference graphs only) merges into the longer one."""
        parts = _note_parts(text)
        for i, (known, graphs) in enumerate(self.notes):
            if parts <= _note_parts(known) or _note_parts(known) <= parts:
                self.notes[i] = (known if parts <= _note_parts(known) else text, graphs + [graph])
                return
        self.notes.append((text, [graph]))


class WeightMemory(NamedTuple):
    """Bytes of a model's parameters as stored now (``full_bytes``) and once deployed
    (``deployed_bytes``: rewritten weights packed, plus their scales). Unpacks like a tuple."""

    full_bytes: int
    deployed_bytes: int

    @property
    def ratio(self) -> float:
        return self.full_bytes / self.deployed_bytes if self.deployed_bytes else float("inf")

    def __str__(self) -> str:
        return (
            f"weights: {format_bytes(self.full_bytes)} float -> {format_bytes(self.deployed_bytes)} deployed "
            f"({self.ratio:.1f}x smaller)"
        )


def format_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, three significant digits)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n} B"


@dataclass
class Report:
    candidates: list[Candidate] = field(default_factory=list)  # every graph's, with its graph index
    graphs: int = 0
    # Counted by explain(), which resets Dynamo's counters around one run; None where not counted
    # (Dynamo counts graph breaks per process, not per compile).
    graph_breaks: Optional[int] = None
    break_reasons: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # passes that raised; graph compiled unmodified
    per_graph: list[GraphSummary] = field(default_factory=list)  # kind and counts of each graph, in compile order
    # The model the report is about, when known (bitcompile.compile sets it): str() then shows its
    # weight memory and weight_memory() needs no argument. A weak reference: the report keeps no model alive.
    model_ref: Optional[weakref.ref] = field(default=None, repr=False, compare=False)

    @property
    def rewritten(self) -> list[Candidate]:
        return [c for c in self.candidates if c.rewritten]

    @property
    def skipped(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.rewritten]

    @property
    def layers(self) -> list[Layer]:
        """Each candidate op once, with the graphs it appears in. An op a graph holds several times
        under one module path (an attention module's two matmuls) is matched by its order there."""
        layers: dict[tuple, Layer] = {}
        seen: dict[tuple, int] = {}
        for c in self.candidates:
            nth = seen[(c.graph, c.module, c.op)] = seen.get((c.graph, c.module, c.op), -1) + 1
            layer = layers.get((c.module, c.op, nth))
            if layer is None:
                layer = layers[(c.module, c.op, nth)] = Layer(c.module, c.op, [], [], [], c.dtype)
            layer.graphs.append(c.graph)
            if c.rewritten:
                layer.rewritten_in.append(c.graph)
            if c.shape not in layer.shapes:
                layer.shapes.append(c.shape)
            layer.add_note(c.reason, c.graph)
        return list(layers.values())

    def weight_memory(self, model=None) -> WeightMemory:
        """Weight bytes of ``model`` (default: the model the report is about) now and deployed:
        deployed counts each rewritten layer's weight at its packed size plus a float32 scale per row.
        A :class:`WeightMemory`; ``full, deployed = report.weight_memory(model)`` still works."""
        if model is None:
            model = self.model_ref() if self.model_ref is not None else None
            if model is None:
                raise ValueError("this report does not know its model: pass it, report.weight_memory(model)")
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        deployed = full
        for c in {c.module: c for c in self.rewritten if c.weight_bits}.values():
            w = getattr(_layer(model, "" if c.module == "(root)" else c.module), "weight", None)
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"layer {c.module!r} has no .weight tensor to measure")
            rows, cols = w.shape[0], math.prod(w.shape[1:])  # shape only: no collective on a sharded DTensor
            packed = rows * ((cols * c.weight_bits + 7) // 8) + 4 * rows
            deployed += packed - w.numel() * w.element_size()
        return WeightMemory(full, deployed)

    def __str__(self) -> str:
        layers = self.layers
        rewritten = sum(layer.status == "rewritten" for layer in layers)
        counts = [sum(g.kind == k for g in self.per_graph) for k in ("training", "inference")]
        kinds = ", ".join(f"{n} {k}" for n, k in zip(counts, ("training", "inference")) if n)
        lines = [
            f"bitnet: {rewritten} of {len(layers)} candidate ops rewritten, {self.graphs} graph(s)"
            + (f", {self.graph_breaks} graph break(s)" if self.graph_breaks is not None else "")
            + (f"; graphs: {kinds}" if kinds else "")
        ]
        model = self.model_ref() if self.model_ref is not None else None
        if model is not None and self.graphs:
            try:
                lines.append(str(self.weight_memory(model)))
            except ValueError:  # a rewritten weight that is no module's .weight (a functional linear)
                pass
        if not self.graphs:
            return "\n".join(lines + ["(no graph compiled yet: the model compiles when it first runs)"])
        if self.graphs > 1:
            lines += [""] + _table(
                [("graph", "kind", "rewritten", "skipped")]
                + [
                    (str(g.index), g.kind + (" (fallback)" if g.fallback else ""), str(g.rewritten), str(g.skipped))
                    for g in self.per_graph
                ]
            )
        rows = [("graphs", "op", "module", "shape", "dtype", "status", "note")]
        for layer in layers:
            shape = layer.shapes[0] + (f" (+{len(layer.shapes) - 1} more)" if len(layer.shapes) > 1 else "")
            rows.append((_ranges(layer.graphs), layer.op, layer.module, shape, layer.dtype, layer.status, layer.note))
        lines += [""] + _table(rows)
        lines += [f"graph break: {r}" for r in self.break_reasons]
        lines += [f"fallback: {f}" for f in self.fallbacks]
        return "\n".join(lines)

    def details(self) -> str:
        """Every candidate of every graph, one row each, with the shape it had in that graph."""
        rows = [("graph", "op", "module", "shape", "dtype", "status", "note")]
        rows += [(str(c.graph), c.op, c.module, c.shape, c.dtype, c.status, c.reason) for c in self.candidates]
        return "\n".join(_table(rows))

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))


def _layer(model, path: str):
    """``model.get_submodule(path)``, also below a DDP/FSDP (``.module``) or torch.compile
    (``._orig_mod``) wrapper: Dynamo traces the wrapped module, so paths are relative to it."""
    for root in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if isinstance(root, nn.Module):
            try:
                return root.get_submodule(path)
            except AttributeError:
                pass
    raise ValueError(
        f"the report's layer {path!r} is not in {type(model).__name__}: is it the model the report is about?"
    )


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _note_parts(note: str) -> set[str]:
    return {p for p in re.split(r"[,;] ", note) if p}


# Reports being collected (explain() pushes one); the backend adds each graph to them and to
# its compile's report. LAST is the report of the compile that produced the most recent graph:
# every graph of that compile so far, not that graph alone.
_ACTIVE: list[Report] = []
LAST: Optional[Report] = None
# The report of each torch.compile call using the backend by name, keyed by the id of torch's
# per-call backend wrapper (dropped with it).
_BY_COMPILE: dict[int, Report] = {}


@contextlib.contextmanager
def collecting() -> Iterator[Report]:
    report = Report()
    _ACTIVE.append(report)
    try:
        yield report
    finally:
        _ACTIVE.remove(report)


def compile_report(caller) -> Report:
    """The report of the compile that called the backend by name, found from the backend's caller frame.

    ``torch.compile(model, backend="bitnet", options=...)`` (and ``model.compile``) makes one
    ``torch._TorchCompileWrapper`` per call, and every graph of that compile, recompiles and DDP
    splits included, reaches the backend through that object's ``__call__``. Called any other way
    (a direct call), the graph gets a report of its own.
    """
    owner = caller.f_locals.get("self") if caller is not None and caller.f_code.co_name == "__call__" else None
    return report_of_compile(owner) or Report()


def report_of_compile(owner) -> Optional[Report]:
    """The report kept for ``owner``, a ``torch._TorchCompileWrapper`` (made on first use and
    dropped with it), or None if ``owner`` is not one."""
    import torch

    if not isinstance(owner, getattr(torch, "_TorchCompileWrapper", ())):
        return None
    report = _BY_COMPILE.get(id(owner))
    if report is None:
        report = _BY_COMPILE[id(owner)] = Report()
        weakref.finalize(owner, _BY_COMPILE.pop, id(owner), None)
    return report


def publish(graph_report: Report, into: Optional[Report] = None, training: bool = False) -> None:
    """Add one graph's report to its compile's report ``into`` (which becomes LAST) and to the
    reports being collected, each numbering the graph after those it already holds."""
    global LAST
    into = into if into is not None else Report()
    targets = [into] + [r for r in _ACTIVE if r is not into]
    for report in targets:
        index = report.graphs
        report.graphs += 1
        rewritten = sum(c.rewritten for c in graph_report.candidates)
        report.per_graph.append(
            GraphSummary(
                index,
                "training" if training else "inference",
                rewritten,
                len(graph_report.candidates) - rewritten,
                fallback=bool(graph_report.fallbacks),
            )
        )
        report.candidates.extend(dataclasses.replace(c, graph=index) for c in graph_report.candidates)
        report.fallbacks.extend(graph_report.fallbacks)
    LAST = into


def next_graph_index(report: Optional[Report] = None) -> int:
    """The index the next graph gets in ``report`` (default: the innermost report being collected)."""
    if report is not None:
        return report.graphs
    return _ACTIVE[-1].graphs if _ACTIVE else 0
