"""What the backend did: every candidate op, rewritten or skipped and why."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional


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
class Report:
    candidates: list[Candidate] = field(default_factory=list)
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # passes that raised; graph compiled unmodified

    @property
    def rewritten(self) -> list[Candidate]:
        return [c for c in self.candidates if c.rewritten]

    @property
    def skipped(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.rewritten]

    def weight_memory(self, model) -> tuple[int, int]:
        """``(full_bytes, deployed_bytes)`` of ``model``'s parameters: deployed counts each
        rewritten layer's weight at its packed size plus a float32 scale per row."""
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        deployed = full
        for c in {c.module: c for c in self.rewritten if c.weight_bits}.values():
            w = model.get_submodule("" if c.module == "(root)" else c.module).weight
            rows, cols = w.shape[0], w[0].numel()
            packed = rows * ((cols * c.weight_bits + 7) // 8) + 4 * rows
            deployed += packed - w.numel() * w.element_size()
        return full, deployed

    def __str__(self) -> str:
        head = (
            f"bitnet: {len(self.rewritten)} of {len(self.candidates)} candidate ops rewritten, "
            f"{self.graphs} graph(s), {self.graph_breaks} graph break(s)"
        )
        rows = [("graph", "op", "module", "shape", "dtype", "status", "note")]
        rows += [(str(c.graph), c.op, c.module, c.shape, c.dtype, c.status, c.reason) for c in self.candidates]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(3, "  ".join("-" * w for w in widths))
        lines += [f"graph break: {r}" for r in self.break_reasons]
        lines += [f"fallback: {f}" for f in self.fallbacks]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))


# Reports being collected (explain() pushes one); the backend writes to all of them
# and keeps the last graph's report in LAST.
_ACTIVE: list[Report] = []
LAST: Optional[Report] = None


@contextlib.contextmanager
def collecting() -> Iterator[Report]:
    report = Report()
    _ACTIVE.append(report)
    try:
        yield report
    finally:
        _ACTIVE.remove(report)


def publish(graph_report: Report) -> None:
    global LAST
    LAST = graph_report
    for report in _ACTIVE:
        report.graphs += 1
        report.candidates.extend(graph_report.candidates)
        report.fallbacks.extend(graph_report.fallbacks)


def next_graph_index() -> int:
    return _ACTIVE[-1].graphs if _ACTIVE else 0
