"""``bitcompile.explain``: compile a model and report what the backend did."""

from __future__ import annotations

import weakref

import torch

from bitcompile.config import BitConfig
from bitcompile.report import Report, collecting


def explain(model, *example_inputs, **options) -> Report:
    """Compile ``model`` with the bitnet backend, run it once on ``example_inputs``, and
    return a :class:`~bitcompile.report.Report` of every candidate op (module path,
    shapes, rewritten or skipped and why) with the number of graphs and graph breaks, and
    the model's weight memory.

    Runs under the caller's grad mode (so it shows the training or the inference
    graphs) and resets Dynamo's caches before and after, as ``torch._dynamo.explain`` does.
    """
    from torch._dynamo.utils import counters

    BitConfig.from_options(options)  # fail early, naming any bad option
    torch._dynamo.reset()
    counters.clear()
    with collecting() as report:
        torch.compile(model, backend="bitnet", options=options or None)(*example_inputs)
    breaks = counters["graph_break"]
    report.graph_breaks = sum(breaks.values())
    report.break_reasons = list(breaks)
    if isinstance(model, torch.nn.Module):
        report.model_ref = weakref.ref(model)
    torch._dynamo.reset()
    return report
