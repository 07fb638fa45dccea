"""``examples/distributed_qat.py`` runs under torchrun on 2 CPU processes (gloo), for 2 steps.

With the model and shapes of ``worker.py`` (2 sequences of 16 tokens per rank), the FSDP2 run
compiles the graphs that ``test_ddp_fsdp.py`` compiled, which Inductor's cache then serves; the
DDP mode's graphs are the same code as those of ``test_ddp_fsdp.py``'s DDP run (without its
small buckets), so its ``--mode ddp`` is left to that run.
"""

import pytest

from tests.distributed.launch import torchrun

pytest.importorskip("transformers")


def test_example_trains_and_prints_the_report():
    out = torchrun(["examples/distributed_qat.py", "--mode", "fsdp2", "--steps", "2", "--batch", "2", "--seq", "16"])
    assert "step    1  loss" in out and "step    2  loss" in out, out
    assert "eval loss (packed weights)" in out, out
    assert "bitnet: 18 of 19 candidate ops rewritten" in out, out  # every decoder linear; lm_head excluded
    assert "model.layers.1.mlp.down_proj" in out, out
