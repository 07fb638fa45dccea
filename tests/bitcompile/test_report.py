"""Reports: one per compile, holding every graph it produced (recompiles, graph breaks, DDP splits),
with counts per graph and for the model, each layer once, and weight memory with units."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bitcompile
from bitcompile import report as reports
from bitcompile.report import Candidate, Report, WeightMemory, format_bytes
from tests.helpers import MLP


def _graph(*candidates) -> Report:
    return Report(candidates=list(candidates))


def _linear(module, rewritten=True, reason="ternary W (per-tensor), A8", shape="x[2, 12] @ W[16, 12]^T"):
    return Candidate(0, "linear", module, shape, "float32", rewritten, reason, weight_bits=2 if rewritten else 0)


def test_layers_are_listed_once_with_the_graphs_they_appear_in():
    report = Report()
    reports.publish(
        _graph(_linear("fc1"), _linear("lm_head", False, "excluded by pattern 'lm_head'")), into=report, training=True
    )
    fused = _linear("fc1", reason="ternary W (per-tensor), A8, epilogue: silu", shape="x[1, 12] @ W[16, 12]^T")
    reports.publish(_graph(fused, _linear("lm_head", False, "excluded by pattern 'lm_head'")), into=report)
    assert reports.LAST is report and report.graphs == 2
    assert [(g.index, g.kind, g.rewritten, g.skipped) for g in report.per_graph] == [
        (0, "training", 1, 1),
        (1, "inference", 1, 1),
    ]
    assert [c.graph for c in report.candidates] == [0, 0, 1, 1]
    layers = {layer.module: layer for layer in report.layers}
    assert list(layers) == ["fc1", "lm_head"]
    assert layers["fc1"].graphs == [0, 1] and layers["fc1"].status == "rewritten"
    assert layers["fc1"].note == "ternary W (per-tensor), A8, epilogue: silu"  # what it became in any graph
    assert layers["lm_head"].status == "skipped"
    text = str(report)
    headline = "bitnet: 1 of 2 candidate ops rewritten, 2 graph(s); graphs: 1 training, 1 inference"
    assert text.splitlines()[0] == headline
    assert text.count("fc1 ") == 1 and "0-1" in text and "(+1 more)" in text

    # A third graph in which fc1 stays float: its status and note say which graphs differ.
    reports.publish(_graph(_linear("fc1", False, "pass failed")), into=report)
    fc1 = report.layers[0]
    assert fc1.status == "partly" and fc1.rewritten_in == [0, 1]
    assert fc1.note == "0-1: ternary W (per-tensor), A8, epilogue: silu | 2: pass failed"


def test_weight_memory_is_a_named_result_with_units():
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 10, bias=False))
    report = Report(candidates=[Candidate(0, "linear", "0", "x", "float32", True, weight_bits=2)], graphs=1)
    memory = report.weight_memory(model)
    full, deployed = memory  # unpacks like the tuple it used to be
    assert isinstance(memory, WeightMemory) and memory == (full, deployed)
    assert memory.full_bytes == 4 * (256 * 512 + 512 * 10)
    assert memory.deployed_bytes == 512 * 64 + 4 * 512 + 4 * 512 * 10  # 2-bit rows + a float32 scale per row
    assert str(memory) == f"weights: 545 kB float -> 55.3 kB deployed ({full / deployed:.1f}x smaller)"
    assert [format_bytes(n) for n in (999, 1000, 1234567, 5 * 10**9)] == ["999 B", "1 kB", "1.23 MB", "5 GB"]
    with pytest.raises(ValueError, match="does not know its model"):
        report.weight_memory()


def test_last_is_the_compile_report_and_counts_every_graph():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 12)
    compiled = torch.compile(model, backend="bitnet")
    compiled(x).sum().backward()  # training graph
    model.eval()
    with torch.no_grad():
        compiled(x)  # inference graph: a recompile of the same compile
    report = reports.LAST
    assert report.graphs == 2 and [g.kind for g in report.per_graph] == ["training", "inference"]
    assert "2 graph(s)" in str(report)
    assert [(layer.module, layer.graphs, layer.status) for layer in report.layers] == [
        ("fc1", [0, 1], "rewritten"),
        ("fc2", [0, 1], "rewritten"),
        ("lm_head", [0, 1], "skipped"),
    ]
    assert bitcompile.report_of(compiled) is report

    # Another compile gets a report of its own. (Other options: with equal ones, Dynamo would reuse
    # the graph above for this second MLP, and nothing would be compiled.)
    with torch.no_grad():
        torch.compile(MLP().eval(), backend="bitnet", options={"exclude": []})(x)
    assert reports.LAST is not report and reports.LAST.graphs == 1 and report.graphs == 2


def test_report_of_a_compiled_model_holds_each_graph_around_a_break():
    class Broken(MLP):
        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            return self.lm_head(torch.relu(self.fc2(h)))

    torch.manual_seed(0)
    model = bitcompile.compile(Broken(), exclude=[])
    report = bitcompile.report_of(model)
    assert report.graphs == 0 and "no graph compiled yet" in str(report)
    model(torch.randn(3, 12))
    assert report.graphs == 2 and reports.LAST is report
    assert [(layer.module, layer.graphs) for layer in report.layers] == [("fc1", [0]), ("fc2", [1]), ("lm_head", [1])]
    assert [g.rewritten for g in report.per_graph] == [1, 2]
    assert str(report).splitlines()[1] == str(report.weight_memory(model))  # the report knows its model


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_optimizer_splits_land_in_one_report(single_process_group):
    """Dynamo's DDP optimizer compiles one graph per gradient bucket: 1 MB buckets put fc1 and
    fc2 (1 MB of weights each) in different graphs, and both reports hold both."""
    torch.manual_seed(0)
    x = torch.randn(4, 512)
    helper = bitcompile.compile(DistributedDataParallel(MLP(512, 512), bucket_cap_mb=1))
    helper(x).square().sum().backward()
    by_name = DistributedDataParallel(MLP(512, 512), bucket_cap_mb=1)
    torch.compile(by_name, backend="bitnet")(x).square().sum().backward()
    for model, report in ((helper, bitcompile.report_of(helper)), (by_name, reports.LAST)):
        assert report.graphs >= 2
        graphs = {layer.module: layer.graphs for layer in report.layers}
        assert set(graphs) == {"fc1", "fc2", "lm_head"} and graphs["fc1"] != graphs["fc2"]
        full, deployed = report.weight_memory(model)  # paths below the DDP wrapper resolve
        assert deployed < full / 10
