"""Where launch configurations come from (shipped table, user cache, BITCOMPILE_RETUNE), how a traced
launch makes one, how the tuner times, and whether the shipped ones still fit the H100."""

import json

import pytest
import torch

from bitcompile.kernels import tuning
from tests.kernels.codegen import H100_SMEM_PER_BLOCK, needs_ptxas


def test_lookup_order_and_retune(tmp_path, monkeypatch):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    (shipped / "gpu.json").write_text(
        json.dumps({"ternary_mm:1,8,8": {"BN": 4}, "grad_input:1,8,8": {"BM": 16}, "weight_pack:8,8": {"BN": 2}})
    )
    (user / "autotune").mkdir(parents=True)
    (user / "autotune" / "gpu.json").write_text(json.dumps({"weight_pack:8,8": {"BN": 8}}))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("BITCOMPILE_CACHE_DIR", str(user))
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning._load("gpu") == {
        "ternary_mm:1,8,8": {"BN": 4},
        "grad_input:1,8,8": {"BM": 16},
        "weight_pack:8,8": {"BN": 8},
    }  # the user's entry wins
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setenv("BITCOMPILE_RETUNE", "ternary_mm, grad_input")
    assert tuning._load("gpu") == {"weight_pack:8,8": {"BN": 8}}  # shipped matmul entries dropped
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setenv("BITCOMPILE_RETUNE", "all")
    assert tuning._load("gpu") == {"weight_pack:8,8": {"BN": 8}}


def test_a_gpu_without_its_own_table_starts_from_its_architectures(tmp_path, monkeypatch):
    (tmp_path / "h100.json").write_text(json.dumps({"ternary_mm:1,8,8": {"BN": 4}}))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path)
    monkeypatch.setattr(tuning, "ARCH_TABLES", {(9, 0): "h100"})
    monkeypatch.setenv("BITCOMPILE_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert tuning._load("h200") == {"ternary_mm:1,8,8": {"BN": 4}}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning._load("a100") == {}  # another architecture: no table, the nearest-or-default rule


def test_untabled_shapes_take_the_nearest_tabled_configuration_unless_tuning_is_asked(tmp_path, monkeypatch):
    table = {
        "ternary_mm:1,4096,4096": {"BN": 4},
        "ternary_mm:1,14336,4096": {"BN": 8},
        "ternary_mm:128,4096,4096": {"BM": 64},
        "grad_input:1024,2048,4096,torch.bfloat16": {"BM": 128},
        "grad_input:1024,2048,4096,torch.float16": {"BM": 64},
    }
    candidates = [{"BN": 2}, {"BN": 4}, {"BN": 8}]
    # K/V projections (1024x4096) are nearest the 4096x4096 entry; 28672x4096 nearest 14336x4096
    assert tuning.nearest(table, "ternary_mm", (1, 1024, 4096), candidates) == {"BN": 4}
    assert tuning.nearest(table, "ternary_mm", (1, 28672, 4096), candidates) == {"BN": 8}
    # labels must agree (the grad dtype); a tabled config that is no candidate here is never used
    assert tuning.nearest(table, "grad_input", (1024, 2048, 4096, "torch.float16"), [{"BM": 32}, {"BM": 64}]) == {
        "BM": 64
    }
    assert tuning.nearest(table, "ternary_mm", (128, 1024, 4096), [{"BN": 2}, {"BN": 16}]) == {"BN": 2}  # no match

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "gpu_name", lambda: "gpu")
    monkeypatch.setattr(tuning, "_load", lambda gpu: dict(table))
    monkeypatch.setattr(tuning, "_memory", {})
    timed = []
    monkeypatch.setattr(tuning, "gpu_microseconds", lambda fn: timed.append(1) or 1.0)
    monkeypatch.setattr(tuning, "_save", lambda *args: None)
    monkeypatch.delenv("BITCOMPILE_AUTOTUNE", raising=False)
    assert tuning.choose("ternary_mm", (1, 1024, 4096), candidates, lambda cfg: None) == {"BN": 4}
    assert not timed and tuning.cached("ternary_mm", (1, 1024, 4096), candidates)
    monkeypatch.setenv("BITCOMPILE_AUTOTUNE", "1")
    assert not tuning.cached("ternary_mm", (1, 2048, 4096), candidates)
    tuning.choose("ternary_mm", (1, 2048, 4096), candidates, lambda cfg: None)
    assert len(timed) == len(candidates)  # every candidate timed when asked


def test_pdl_is_opt_in_and_needs_a_hopper_gpu(monkeypatch):
    """Programmatic dependent launch only with ``BITCOMPILE_PDL=1``, on CUDA devices of compute
    capability 9.0 and up, and never in the interpreter."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("BITCOMPILE_PDL", raising=False)
    assert not tuning.pdl(cuda)
    monkeypatch.setenv("BITCOMPILE_PDL", "1")
    assert tuning.pdl(cuda) and not tuning.pdl(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not tuning.pdl(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tuning.pdl(cuda)


def test_traced_tma_launch_follows_the_wrapper(monkeypatch):
    """A tuned GEMM configuration with activations by TMA, launched traced (as Inductor will
    make it): under the Python wrapper the kernel builds its descriptor on the device; under
    the C++ wrapper it loads by pointers (torch 2.11's C++ launch code gives the descriptors
    one program's scratch for the whole grid; ``tuning.device_descriptors_ok``). Recorded, not run."""
    import torch
    from torch._inductor import config

    from bitcompile.kernels import ternary_matmul as tm

    monkeypatch.setattr(tuning, "interpreting", lambda: False)  # the GPU's candidates and flags
    cfg = next(c for c in tm._gemm_configs(1024) if c.get("A_TMA"))
    monkeypatch.setattr(tuning, "choose", lambda kernel, key, candidates, run: cfg)
    monkeypatch.setattr(tuning, "tune_before_tracing", lambda *args: None)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    k = 512
    wq = torch.randint(0, 256, (64, k // (4 * tm.QUARTER) * tm.QUARTER), dtype=torch.uint8)  # K-blocked bytes
    a = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    for cpp_wrapper in (False, True):
        with config.patch(cpp_wrapper=cpp_wrapper):
            tm.ternary_matmul(a, wq, k, layout="kblocked", wrap=lambda kernel: Recorder())
    assert [(kw["A_TMA"], kw["HOST_DESC"]) for kw in launches] == [(True, False), (False, False)]


@needs_ptxas
def test_shipped_configs_fit_the_h100(profiles):
    """The shipped launch configurations (used without being timed again) still compile
    without spills into the H100's shared memory after kernel changes."""
    bad = [r for r in profiles if r["spill_bytes"] or r["smem_bytes"] > H100_SMEM_PER_BLOCK]
    assert not bad, bad
    assert {r["key"].split(":")[0] for r in profiles} == {"ternary_mm", "grad_input"}


@pytest.mark.gpu
def test_tuner_timing_excludes_host_latency():
    """The tuner ranks configurations by GPU time: 200 us of host work before a ~5 us launch
    must not be counted (Triton's do_bench counts it when it outlasts its L2 flush)."""
    import time

    from bitcompile.kernels import tuning

    x = torch.zeros(1 << 20, device="cuda")

    def slow_launch():
        time.sleep(2e-4)
        x.add_(1)

    assert tuning.gpu_microseconds(slow_launch) < 100
