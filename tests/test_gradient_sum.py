"""The replicas' gradient sum (frzoo.executors.gradient_sum.GradientSum) in two gloo processes, on a
small model with a bucket cap small enough for several buckets: fast, direct checks of what the
R=2 x K=2 runs of tests/test_replicas.py check end to end.

- Overlap is real: buckets are launched from the gradient hooks while the backward runs, in
  bucket order, and the sums equal those of the after-backward path bit for bit.
- fp16: a copy whose received delta holds inf/NaN while its gradients are finite (a ReLU's
  backward can mask it) makes every copy skip, and the copies' scalers stay equal.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from frzoo.executors import replicas
from frzoo.executors.gradient_sum import GradientSum, plan_buckets
from frzoo.loss_scale import LossScaler

CAP = 1024  # bytes: the model below needs 6 buckets


class Algo:
    """What GradientSum reads of an algorithm: its part, its scaler, its index."""

    def __init__(self, part: nn.Module, scaler: Any = None) -> None:
        self.part, self.scaler, self.index = part, scaler, 0


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def backward(net: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(10 + rank)
    net(torch.randn(6, 16, generator=g)).square().sum().backward()


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    launches: List[bool] = []  # per all_reduce: called inside the backward?
    original = dist.all_reduce

    def recording(*args: Any, **kwargs: Any) -> Any:
        launches.append(torch._C._current_graph_task_id() != -1)
        return original(*args, **kwargs)

    dist.all_reduce = recording  # type: ignore[assignment]
    result: Dict[str, Any] = {}
    nets = {}
    for overlap in (True, False):
        net = model()
        sums = GradientSum(Algo(net), group, bucket_bytes=CAP, overlap=overlap)
        launches.clear()
        for _ in range(2):  # two steps: the hooks re-arm
            sums.arm()
            backward(net, rank)
            during = list(launches)
            assert sums(Algo(net))
            for p in net.parameters():
                p.grad = None
            backward(net, rank)  # a backward outside a step (not armed): ignored
            for p in net.parameters():
                p.grad = None
        result[f"launches_{overlap}"] = (during, list(launches))
        sums.arm()
        backward(net, rank)
        sums(Algo(net))
        nets[overlap] = [p.grad.clone() for p in net.parameters()]
        sums.remove()
    result["equal"] = all(torch.equal(a, b) for a, b in zip(nets[True], nets[False]))

    # fp16: replica 0's delta held inf, its gradients are finite: both copies must skip
    net = model()
    scaler = LossScaler(is_last=False, init_scale=1024.0, growth_interval=2)
    algo = Algo(net, scaler)
    sums = GradientSum(algo, group, bucket_bytes=CAP, overlap=True)
    steps = []
    for step in range(2):
        sums.arm()
        delta = torch.full((2,), float("inf") if (rank == 0 and step == 0) else 1.0)
        scaler.receive((delta,), 1024.0)
        backward(net, rank)
        scaled = [p.grad.clone() for p in net.parameters()]
        steps.append(sums(algo))
        if step == 1:  # each bucket was unscaled by its hook, in the backward; then summed
            result["unscaled_sum"] = [p.grad.clone() for p in net.parameters()]
            result["mine"] = scaled
        for p in net.parameters():
            p.grad = None
    result["fp16"] = (steps, scaler.state_dict())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_buckets_follow_reverse_registration_order():
    net = model()
    params = list(net.parameters())
    buckets = plan_buckets(params, CAP)
    assert [i for b in buckets for i in b] == list(reversed(range(len(params))))
    assert len(buckets) == 6 and all(
        sum(params[i].numel() * 4 for i in b) <= CAP or len(b) == 1 for b in buckets)
    assert plan_buckets(params, replicas.BUCKET_BYTES) == [list(reversed(range(len(params))))]


def test_overlapped_sums_launch_during_the_backward_and_equal_the_after_backward_sums():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    for r in ranks:
        during, total = r["launches_True"]
        # 6 buckets a step, all launched from the hooks, inside the backward, in 2 steps
        assert len(total) == 12 and all(total) and during == total
        during, total = r["launches_False"]
        assert len(total) == 12 and not any(total)  # after the backward
        assert r["equal"]
    # fp16: both copies skip step 0 (only replica 0's delta was bad), both step at step 1
    assert ranks[0]["fp16"] == ranks[1]["fp16"]
    steps, state = ranks[0]["fp16"]
    assert steps == [False, True] and state["skipped"] == 1 and state["overflow"] == 1024.0
    mine = [a + b for a, b in zip(ranks[0]["mine"], ranks[1]["mine"])]
    assert not torch.equal(ranks[0]["mine"][0], ranks[1]["mine"][0])
    assert all(torch.equal(a, b) for a, b in zip(mine, ranks[0]["unscaled_sum"]))
