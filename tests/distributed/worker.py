"""One rank of the distributed QAT runs that ``test_ddp_fsdp.py`` checks; ``torchrun`` starts two.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed/worker.py OUT``

Each rank trains the tiny Llama of ``tests.models.zoo`` (same seed, so the same initial weights on
every rank and in the single-process reference) on its half of one fixed batch, three ways:

* ``ddp``: ``bitcompile.compile(DDP(model))`` (the documented way), small buckets, so Dynamo's DDP
  optimizer splits the model into several graphs;
* ``ddp_by_name``: ``torch.compile(DDP(model), backend="bitnet")``, one step;
* ``fsdp``: ``fully_shard`` on each decoder layer and the root, then ``bitcompile.compile``.

It writes what the tests compare to ``OUT/rank<r>.pt``: losses, gradients after reduction and
parameters after training (full tensors; also all-gathered from every rank), the weights and
scales the compiled graphs quantized, eval logits of the compiled model and of its eager
reference twin, and the report. :func:`single_process` is the same training in one process on the
whole batch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

STEPS = 4
LR = 1.0  # plain SGD: the update is the reduced gradient times LR, nothing rescales differences
BATCH, SEQ = 4, 16  # the global batch; each of the 2 ranks takes 2 rows
BUCKET_MB = 0.04  # ~40 kB DDP buckets: the tiny Llama (90 kB of weights) splits into 2 graphs


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch (the same every step, so the loss falls fast) and an eval batch."""
    g = torch.Generator().manual_seed(1)
    # The eval batch has the shape of a rank's training batch: the example's smoke test then finds its
    # inference graphs in Inductor's cache too.
    return torch.randint(0, 64, (BATCH, SEQ), generator=g), torch.randint(0, 64, (BATCH // 2, SEQ), generator=g)


def fresh_model():
    from tests.models import zoo

    torch.manual_seed(0)
    model, _, loss_fn = zoo.llama()
    return model, loss_fn


class QuantizeRecorder:
    """Records the weight and scale of every ``bitnet::quantize_weights`` call while ``on``: the
    op's CPU kernel, which Inductor's code calls in QAT graphs, wrapped around the reference."""

    def __init__(self):
        from bitcompile.numerics import reference

        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.on = False

        def kernel(w, scheme, per_channel):
            wq, scale = reference.quantize_weights(w, scheme, per_channel)
            if self.on:
                self.calls.append((w.detach().clone(), scale.clone()))
            return wq, scale

        import bitcompile.ops  # noqa: F401  (defines the op)

        torch.library.register_kernel("bitnet::quantize_weights", "cpu", kernel)


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one plain tensor (FSDP2's are sharded DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(
    model: torch.nn.Module, call: Callable, loss_fn, ids: torch.Tensor, steps: int, recorder=None, opt=None
) -> dict:
    """``steps`` SGD steps of ``call`` on ``ids``: losses (averaged over ranks), the gradients after
    each backward (after DDP's / FSDP's reduction), the parameters after the last step."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    out = {"losses": [], "grads": []}
    for step in range(steps):
        if recorder is not None:
            recorder.on = step == 0
        x = {"input_ids": ids}
        loss = loss_fn(call(**x), x)
        loss.backward()
        if recorder is not None:
            recorder.on = False
        loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        out["losses"].append(loss.item())
        out["grads"].append({n: full(p.grad).clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    out["params"] = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return out


def gathered(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's ``tensors``, flattened into one vector each (``all_gather``)."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


def evaluate(call: Callable, plain: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Compiled logits in eval / no_grad, and those of the eager reference twin of ``plain``
    (an undistributed model holding the same weights)."""
    from bitcompile.nn.reference_model import reference_model

    twin = reference_model(plain).eval()
    with torch.no_grad():
        return {"compiled": call(input_ids=ids).logits.clone(), "twin": twin(input_ids=ids).logits.clone()}


def unwrapped_copy(params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain model holding ``params`` (full tensors)."""
    model, _ = fresh_model()
    model.load_state_dict(params)  # the Llama's state dict is its parameters (inv_freq is not persistent)
    return model


def report_summary(report) -> dict:
    return {
        "text": str(report),
        "layers": [(layer.module, layer.op, layer.graphs, layer.status) for layer in report.layers],
        "kinds": [g.kind for g in report.per_graph],
        "counts": [(g.rewritten, g.skipped) for g in report.per_graph],
        "weight_memory": tuple(report.weight_memory()) if report.model_ref is not None else None,
    }


def run_ddp(rank: int, world: int, recorder: QuantizeRecorder) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    import bitcompile

    ids, eval_ids = data()
    model, loss_fn = fresh_model()
    # Dynamo's DDP optimizer takes the first bucket's cap from this constant (1 MB), not from the
    # DDP module, and refuses a first bucket larger than the others: match what DDP does for
    # bucket_cap_mb below 1 MB (its first bucket gets the same cap).
    dist._DEFAULT_FIRST_BUCKET_BYTES = int(BUCKET_MB * 1024 * 1024)
    ddp = bitcompile.compile(DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB))
    recorder.calls.clear()
    out = train(model, ddp, loss_fn, ids.chunk(world)[rank], STEPS, recorder)
    out["quantized"] = list(recorder.calls)
    out["gathered_grads"] = gathered(out["grads"][0])
    out["gathered_params"] = gathered(out["params"])
    model.eval()
    out["eval"] = evaluate(ddp, model, eval_ids)
    out["report"] = report_summary(bitcompile.report_of(ddp))
    return out


def run_ddp_by_name(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    import bitcompile

    ids, _ = data()
    model, loss_fn = fresh_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
    compiled = torch.compile(ddp, backend="bitnet")
    out = train(model, compiled, loss_fn, ids.chunk(world)[rank], 1)
    out["report"] = report_summary(bitcompile.report_of(compiled))
    return out


def run_fsdp(rank: int, world: int, recorder: QuantizeRecorder) -> dict:
    from torch.distributed.fsdp import fully_shard

    import bitcompile

    ids, eval_ids = data()
    model, loss_fn = fresh_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    bitcompile.compile(model)
    # Before any forward: after a no_grad forward FSDP2 leaves the root's parameters unsharded
    # (reshard_after_forward is off for the root), and parameters() would list those.
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = {"initial": {n: full(p.detach()).clone() for n, p in model.named_parameters()}}
    # Eval before training: the inference graphs cache packed weights; the second eval must not
    # be served the first one's.
    model.eval()
    out["eval_before"] = evaluate(model, unwrapped_copy(out["initial"]), eval_ids)
    model.train()
    recorder.calls.clear()
    out.update(train(model, model, loss_fn, ids.chunk(world)[rank], STEPS, recorder, opt))
    out["quantized"] = list(recorder.calls)
    out["gathered_grads"] = gathered(out["grads"][0])
    out["gathered_params"] = gathered(out["params"])
    out["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    model.eval()
    out["eval"] = evaluate(model, unwrapped_copy(out["params"]), eval_ids)
    out["report"] = report_summary(bitcompile.report_of(model))
    return out


def single_process() -> dict:
    """The same training in one process on the whole batch, bitnet-compiled."""
    import bitcompile

    ids, _ = data()
    model, loss_fn = fresh_model()
    return train(model, bitcompile.compile(model), loss_fn, ids, STEPS)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recorder = QuantizeRecorder()
    results = {"world": world}
    runs = {
        "ddp": lambda: run_ddp(rank, world, recorder),
        "ddp_by_name": lambda: run_ddp_by_name(rank, world),
        "fsdp": lambda: run_fsdp(rank, world, recorder),
    }
    for name, run in runs.items():
        torch._dynamo.reset()  # each run compiles its own graphs
        start = time.perf_counter()
        results[name] = run()
        dist.barrier()
        print(f"rank {rank}: {name} took {time.perf_counter() - start:.1f} s", flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
