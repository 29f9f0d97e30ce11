"""frzoo's gpipe and 1f1b against torch's own ScheduleGPipe and Schedule1F1B.

The same two parts of the same model, wrapped as torch.distributed.pipelining PipelineStages in
two gloo processes, run one step of M = 4 micro-batches; frzoo runs the same step in one process
(its distributed executor equals its local one bit for bit: tests/test_pipelines.py,
tests/test_distributed_nccl_rules.py). torch divides the summed gradients by M after the backward
(`scale_grads`), frzoo each micro-batch's loss by M before it: with M a power of two both are exact
scalings by 1/4, so the losses and the gradients must be EQUAL, not merely close.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from frzoo.algorithms.pipelines import GPipe, OneFOneB
from test_engine import CUTS, batches, make_executor, tiny_model

M = 4


def _stage_worker(rank: int, store: str, out: str, name: str) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = tiny_model()
    stage = PipelineStage(nn.Sequential(*[model[i] for i in CUTS[2][rank]]), rank, 2,
                          torch.device("cpu"))
    schedule = (ScheduleGPipe if name == "gpipe" else Schedule1F1B)(
        stage, M, loss_fn=F.cross_entropy)
    x, y = batches(1, batch=8)[0]
    losses: list = []
    if rank == 0:
        schedule.step(x)
    else:
        schedule.step(target=y, losses=losses)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "losses": losses}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def frzoo_step(cls) -> tuple:
    """One frzoo step of `cls` on the same model and batch: the step's loss (the micro-batches'
    losses / M, summed) and every parameter's gradient right before the optimizer step."""
    torch.set_num_threads(1)
    model = tiny_model()
    executor = make_executor(model, 2, cls, microbatches=M)
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict = {}
    for algo in executor.algorithms:
        algo.before_update = lambda a: grads.update(
            {names[id(p)]: p.grad.clone() for p in a.part.parameters()})
    x, y = batches(1, batch=8)[0]
    return executor.train_step((x, y), 0).loss, grads


@pytest.mark.parametrize("name,cls", [("gpipe", GPipe), ("1f1b", OneFOneB)])
def test_frzoo_schedule_equals_torchs(name, cls):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_stage_worker, args=(os.path.join(tmp, "store"), tmp, name), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    theirs = {**ranks[0]["grads"], **ranks[1]["grads"]}
    loss, mine = frzoo_step(cls)
    assert sorted(theirs) == sorted(mine)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert float(loss) == float(torch.stack(ranks[1]["losses"]).detach().sum() / M)
