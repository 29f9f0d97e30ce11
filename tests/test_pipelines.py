"""Synchronous schedules (gpipe, 1f1b, zb1) against references that cannot drift.

- With M micro-batches each equals, bit for bit, a plain loop written here without frzoo's
  engine: the unsplit model, the M micro-batches in order, each loss divided by M, the gradients
  accumulated, one optimizer step.
- gpipe == 1f1b == zb1 bit for bit; with M = 1 they equal `bp`.
- The schedules themselves: each part runs every micro-batch once, no schedule deadlocks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frzoo.algorithms.actions import pair_messages, simulate
from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.pipelines import GPipe, OneFOneB, ZeroBubbleH1
from frzoo.config import load_recipe
from frzoo.run import train as train_run
from test_distributed_nccl_rules import TINY, assert_same_tree, run
from test_engine import assert_same_weights, batches, make_executor, optimizer, tiny_model, train

SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB, "zb1": ZeroBubbleH1}


def plain_loop(model, data, microbatches: int):
    """Gradient accumulation over the unsplit model: what every schedule must compute."""
    opt = optimizer(model.parameters())
    losses = []
    for x, y in data:
        step_losses = []
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            loss = F.cross_entropy(model(xm), ym) / microbatches
            loss.backward()
            step_losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(torch.stack(step_losses).sum()))  # the step's loss, as reported
    return losses


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("k,m", [(2, 3), (3, 2), (3, 6)])
def test_schedule_is_gradient_accumulation_bit_for_bit(name, k, m):
    data = batches(4, batch=6)
    split, whole = tiny_model(), tiny_model()
    losses = train(make_executor(split, k, SCHEDULES[name], microbatches=m), data)
    plain = plain_loop(whole, data, m)
    assert losses == plain
    assert_same_weights(split, whole)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_one_microbatch_is_backprop_bit_for_bit(name):
    data = batches(4)
    a, b = tiny_model(), tiny_model()
    assert train(make_executor(a, 3, SCHEDULES[name], microbatches=1), data) == \
        train(make_executor(b, 3, Backprop), data)
    assert_same_weights(a, b)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_every_schedule_runs(name, k, m):
    lists = SCHEDULES[name].schedule(k, m)
    order = simulate(lists)
    assert len(order) == sum(map(len, lists))
    for first in range(k - 1):
        messages = pair_messages(order, k, first)
        assert sorted((x.kind, x.micro) for x in messages) == \
            sorted([("act", i) for i in range(m)] + [("delta", i) for i in range(m)])


def test_a_checkpoint_resumes_a_synchronous_schedule_exactly(tmp_path):
    """A step ends with the pipeline drained: a run stopped at step 4 and resumed to 8 equals
    one that never stopped, bit for bit (local executor; distributed == local is tested in
    tests/test_distributed_nccl_rules.py)."""
    zb1 = ["split.points=[layer2.0.conv2]", "model.kwargs.drop_block_rate=0.0",
           "algorithm.name=zb1", "algorithm.microbatches=2", "executor=local",
           "train.checkpoint_every=2"]
    run(tmp_path / "straight", *zb1, "train.max_steps=8")
    run(tmp_path / "stopped", *zb1, "train.max_steps=4")
    cfg = load_recipe(None, [*TINY, *zb1, "train.max_steps=8",
                             f"run.out_dir={tmp_path / 'stopped'}"])
    train_run(cfg, tmp_path / "stopped", resume=True)
    assert_same_tree(torch.load(tmp_path / "straight" / "final.pt", weights_only=True),
                     torch.load(tmp_path / "stopped" / "final.pt", weights_only=True), "final.pt")
