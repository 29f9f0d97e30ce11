"""Data-parallel replicas of the K-part pipeline (`distributed.replicas: R`).

R x K processes. The rank layout is replica-major: rank = r * K + k runs part k+1 of replica r,
so a replica's parts are consecutive ranks (under torchrun, on one node: activations and deltas
stay on its fast links) and only the copies of one part, which sit K ranks apart, talk across
replicas. Point-to-point messages stay inside a replica (frzoo.executors.p2p); what crosses
replicas goes through one process group per part (:func:`part_groups`), with torch's collectives:

- gradients: before each optimizer step the R copies of part k all-reduce (sum) their gradients
  (:class:`GradientSum`). Each replica's loss is its mean loss times its share of the global
  batch (:class:`ShardLoss`), so the sum is the gradient of the global batch's mean loss, and
  every delta a part sends down is the delta of the global batch's loss for its rows: the
  messages, histories and mailboxes of R replicas concatenated are those of one pipeline, which
  is what makes a checkpoint independent of R (:func:`merge_part_states`, :func:`shard_state`).

  Why not DistributedDataParallel: its reducer pairs one backward with each forward of the
  wrapped module, and fires its bucket hooks on that backward. Under Features Replay a part runs
  two forwards per step (the play without a graph, the replay with one), under DDG it
  backpropagates a graph built on a copy of the weights (its gradients are assigned, not
  accumulated, so no hook fires) and the warm-up steps on zero gradients without any backward.
  `no_sync` and `static_graph` do not describe that. One explicit, bucketed all-reduce right
  before the step, called from the algorithm's `before_update` hook, is correct for all three
  algorithms and every warm-up mode; the buckets go out asynchronously and are waited for
  together, so their transfers overlap each other (not the backward).
- BatchNorm (`distributed.sync_bn`): :class:`GroupBatchNorm` all-reduces the per-channel sums
  with the part's group, in the play and the replay alike (and back through the backward).
  torch's SyncBatchNorm refuses CPU tensors in this torch version (it needs a GPU), so the
  synchronisation is written with a differentiable dist.all_reduce instead (:class:`_GroupSum`).
- metrics: the last parts' loss, logits and targets are gathered to the leader (replica 0's last
  part), evaluation totals are summed there.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..algorithms.base import ForwardResult
from ..data import shard_rows
from ..errors import FrzooError

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket size


@dataclass(frozen=True)
class Layout:
    """Where rank `rank` sits among R replicas of K parts (replica-major)."""
    rank: int
    parts: int  # K
    replicas: int = 1  # R

    @property
    def replica(self) -> int:
        return self.rank // self.parts

    @property
    def part(self) -> int:
        """0-based index of the part this rank runs."""
        return self.rank % self.parts

    @property
    def world(self) -> int:
        return self.parts * self.replicas

    def rank_of(self, part: int, replica: Optional[int] = None) -> int:
        """The global rank of `part` (0-based) in `replica` (default: this rank's)."""
        return (self.replica if replica is None else replica) * self.parts + part

    @property
    def leader(self) -> int:
        """The rank that logs and writes files: the last part of replica 0."""
        return self.parts - 1

    def name(self, rank: Optional[int] = None) -> str:
        """`part k (rank n)`, or `part k of replica r (rank n)` when there are replicas."""
        rank = self.rank if rank is None else rank
        where = f" of replica {rank // self.parts}" if self.replicas > 1 else ""
        return f"part {rank % self.parts + 1}{where} (rank {rank})"


def part_groups(layout: Layout, timeout_s: float) -> List[Any]:
    """One process group per part: the R copies of part k (ranks k, K+k, 2K+k, ...). Every rank
    creates all K groups, in part order (torch requires every rank to take part in each
    new_group call, in the same order)."""
    return [dist.new_group([layout.rank_of(k, r) for r in range(layout.replicas)],
                           timeout=timedelta(seconds=timeout_s))
            for k in range(layout.parts)]


def replica_seed(seed: int, replica: int) -> int:
    """The seed of a replica's dropout/drop-path masks: replica 0 keeps the run's seed, the
    others get their own, so the R shards of a batch do not share one mask pattern."""
    return seed if replica == 0 else (seed * 1_000_003 + 7919 * replica) % (2 ** 63 - 1)


class ShardLoss:
    """The last part's loss on a replica's shard: its mean loss times the shard's share of the
    global batch (rows / global rows), set each step by the executor. Summed over replicas, the
    losses and their gradients are those of the global batch's mean loss."""

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.loss_fn = loss_fn
        self.share = 1.0

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(logits, target) * self.share


class GradientSum:
    """Sums the gradients of the R copies of one part before its optimizer step (the
    algorithm's `before_update` hook): gradients flattened into buckets of at most
    BUCKET_BYTES, one asynchronous all_reduce per bucket, all waited for, copied back.
    Parameters without a gradient are left out (every copy runs the same graph, so they agree)."""

    def __init__(self, group: Any, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group = group
        self.bucket_bytes = bucket_bytes

    def __call__(self, algo: Any) -> None:
        grads = [p.grad for p in algo.part.parameters() if p.grad is not None]
        buckets: List[List[Tensor]] = []
        size = 0
        for g in grads:
            if not buckets or size + g.numel() * g.element_size() > self.bucket_bytes \
                    or buckets[-1][0].dtype != g.dtype or buckets[-1][0].device != g.device:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel() * g.element_size()
        flats = [_flatten_dense_tensors(b) for b in buckets]
        works = [dist.all_reduce(f, group=self.group, async_op=True) for f in flats]
        for bucket, flat, work in zip(buckets, flats, works):
            work.wait()
            for g, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(summed)


# ---------------------------------------------------------------- BatchNorm over the replicas
class _GroupSum(torch.autograd.Function):
    """all_reduce (sum) over a process group, differentiable: the gradient of a sum that every
    copy uses is the sum of the copies' gradients, so the backward all-reduces too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the whole global batch: the per-channel
    sum, count and sum of squared deviations are all-reduced over `group` (two passes, for the
    same accuracy as one process's BatchNorm), differentiably, so the backward sums the
    statistics' gradients over the replicas too. Running statistics are updated from the global
    mean and unbiased variance, as BatchNorm does; evaluation uses them unchanged. It holds the
    BatchNorm it replaces' own parameters and buffers (same names, same objects)."""

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, group: Any) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine,
                         source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.group = group
        self.train(source.training)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        factor = 0.0
        update = self.track_running_stats and self.num_batches_tracked is not None
        if update:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / xf.shape[1]])])
        total = _GroupSum.apply(local, self.group)
        count = total[-1]
        mean = total[:-1] / count
        centred = xf - mean.view(shape)
        var = _GroupSum.apply((centred * centred).sum(dims), self.group) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if update:
            with torch.no_grad():
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(
                    var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module, group: Any) -> int:
    """Replace every torch BatchNorm1d/2d/3d in `module` by a GroupBatchNorm over `group`, in
    place; returns how many. A BatchNorm subclass with more in its forward (e.g. timm's
    BatchNormAct2d) would lose that, so it is an error naming the module."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in plain:
            setattr(module, name, GroupBatchNorm(child, group))
            count += 1
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) \
                and not isinstance(child, GroupBatchNorm):
            raise FrzooError(
                f"distributed.sync_bn=true: module '{name}' is a {type(child).__name__}, a "
                f"BatchNorm with more in its forward; frzoo synchronises torch's BatchNorm1d/2d/3d "
                f"only. Set distributed.sync_bn=false (each replica normalises with its own rows) "
                f"or build the model with torch's BatchNorm.")
        else:
            count += sync_batch_norm(child, group)
    return count


def broadcast_buffers(module: nn.Module, group: Any, src: int) -> None:
    """Give every copy of a part replica 0's buffers (BatchNorm's running statistics), as DDP
    does: called before evaluation and checkpoints, so evaluation is one model's and a resumed
    run starts from what every replica held."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src, group=group)


# ---------------------------------------------------------------- metrics
def _wire(group: Any, device: torch.device) -> torch.device:
    """Where a gather/reduce's tensors must be: NCCL takes the GPU's, gloo CPU tensors only."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather_train_result(loss: Tensor, logits: Tensor, target: Tensor, group: Any, layout: Layout,
                        rows: Sequence[int]) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """The last parts' (loss, logits, targets) of one step, gathered to the leader: the summed
    loss (the global batch's mean loss: see ShardLoss) and the rows in replica order, i.e. the
    global batch. `rows` are every replica's row counts. None on the other ranks."""
    width = logits.shape[1] + 2
    packed = torch.zeros(max(rows), width, dtype=torch.float32,
                         device=_wire(group, logits.device))
    packed[:len(target), :-2] = logits.detach().float().to(packed.device)
    packed[:len(target), -2] = target.float().to(packed.device)
    packed[0, -1] = loss.detach().float().to(packed.device)
    leader = layout.rank == layout.leader
    out = [torch.empty_like(packed) for _ in rows] if leader else None
    dist.gather(packed, out, dst=layout.leader, group=group)
    if out is None:
        return None
    pieces = [p[:n] for p, n in zip(out, rows)]
    total_loss = torch.stack([p[0, -1] for p in out]).sum()
    return (total_loss, torch.cat([p[:, :-2] for p in pieces]),
            torch.cat([p[:, -2] for p in pieces]).long())


def reduce_eval_totals(totals: Any, group: Any, layout: Layout, device: torch.device) -> None:
    """Sum the evaluation totals (loss sum, top-1, top-5, count) of the last parts into the
    leader's `totals` (each replica evaluated its own test batches)."""
    values = torch.tensor([totals.loss, totals.top1, totals.top5, totals.count],
                          dtype=torch.float64, device=_wire(group, device))
    dist.reduce(values, dst=layout.leader, group=group)
    # num_classes: the leader's own (replica 0 always evaluates the first test batch)
    totals.loss, totals.top1, totals.top5, totals.count = (float(v) for v in values)


# ---------------------------------------------------------------- checkpoints
def merge_part_states(states: Sequence[Dict[str, Any]], batch_keys: Sequence[str]
                      ) -> Dict[str, Any]:
    """One part's checkpoint state from its R copies: replica 0's weights and optimizer state
    (every copy holds the same: they step on the same summed gradient; buffers were broadcast),
    and the algorithm's per-sample state (`batch_keys`: lists of batch-first tensors, e.g.
    Features Replay's history) concatenated over the replicas, i.e. the global batch's."""
    merged = dict(states[0])
    algorithm = dict(states[0]["algorithm"])
    for key in batch_keys:
        if key in algorithm:
            algorithm[key] = concat_shards([s["algorithm"][key] for s in states])
    merged["algorithm"] = algorithm
    return merged


def concat_shards(shards: Sequence[Sequence[Any]]) -> List[Any]:
    """[t_0 of replica 0 ++ t_0 of replica 1 ++ ..., t_1 ..., ...]: per entry, the rows of all
    replicas in replica order. An entry is a tensor, or (a cut crossed by several tensors,
    frzoo.activation's saved form) a list of tensors and Nones, concatenated tensor by tensor."""
    return [_concat(entry) for entry in zip(*shards)]


def _concat(copies: Sequence[Any]) -> Any:
    if isinstance(copies[0], Tensor):
        return torch.cat(copies)
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*copies)]


def shard_tensors(entries: Sequence[Any], layout: Layout) -> List[Any]:
    """This replica's rows of each global-batch entry (the inverse of concat_shards)."""
    out: List[Any] = []
    for entry in entries:
        tensors = [entry] if isinstance(entry, Tensor) else [t for t in entry if t is not None]
        lo, hi = shard_rows(tensors[0].shape[0], layout.replica, layout.replicas)
        out.append(entry[lo:hi] if isinstance(entry, Tensor)
                   else [None if t is None else t[lo:hi] for t in entry])
    return out


def shard_state(state: Dict[str, Any], batch_keys: Sequence[str], layout: Layout
                ) -> Dict[str, Any]:
    """A part's checkpoint state (global batch) with its per-sample entries cut to this
    replica's rows: what this replica held when the checkpoint was written."""
    algorithm = dict(state["algorithm"])
    for key in batch_keys:
        if key in algorithm:
            algorithm[key] = shard_tensors(algorithm[key], layout)
    return {**state, "algorithm": algorithm}


# ---------------------------------------------------------------- one rank's replica duties
class Replica:
    """What one rank of a replicated job does beyond its pipeline's messages: the distributed
    executor calls it at the points where the copies of its part meet (see the module
    docstring). `join` wires it into the part's algorithm."""

    def __init__(self, algo: Any, layout: Layout, groups: Sequence[Any]) -> None:
        self.algo, self.layout = algo, layout
        self.group = groups[layout.part]  # the R copies of this rank's part
        self.src = layout.rank_of(layout.part, 0)  # this part's copy in replica 0
        self.loss: Optional[ShardLoss] = None

    @classmethod
    def join(cls, algo: Any, layout: Layout, groups: Sequence[Any], *, sync_bn: bool) -> "Replica":
        """Make `algo` one copy of its part: gradients summed over the copies before each step,
        the last part's loss weighted by the shard's share, its own dropout seed, and (sync_bn)
        BatchNorm over the global batch."""
        replica = cls(algo, layout, groups)
        if sync_bn:
            sync_batch_norm(algo.part, replica.group)
        algo.before_update = GradientSum(replica.group)
        algo.seed = replica_seed(algo.seed, layout.replica)
        if algo.is_last:
            replica.loss = algo.loss_fn = ShardLoss(algo.loss_fn)
        return replica

    def rows(self, global_rows: int) -> int:
        lo, hi = shard_rows(global_rows, self.layout.replica, self.layout.replicas)
        return hi - lo

    def all_rows(self, global_rows: int) -> List[int]:
        return [hi - lo for lo, hi in (shard_rows(global_rows, r, self.layout.replicas)
                                       for r in range(self.layout.replicas))]

    def before_step(self, rows: int, global_rows: int) -> None:
        if self.loss is not None:
            self.loss.share = rows / global_rows

    def gather_result(self, result: Any, global_rows: int) -> Any:
        """The step's ForwardResult for the global batch on the leader; None elsewhere."""
        gathered = gather_train_result(result.loss, result.logits, result.target, self.group,
                                       self.layout, self.all_rows(global_rows))
        if gathered is None:
            return None
        loss, logits, target = gathered
        return ForwardResult(loss=loss, logits=logits, target=target)

    def reduce_eval(self, totals: Any) -> None:
        reduce_eval_totals(totals, self.group, self.layout, self.algo.device)

    def share_buffers(self) -> None:
        broadcast_buffers(self.algo.part, self.group, self.src)

    def merge_checkpoint(self, gathered: Sequence[Tuple[Dict[str, Any], List[Tensor]]],
                         batch_keys: Sequence[str]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """The leader's checkpoint from every rank's (part state, unused deltas): one
        pipeline's, as a one-replica run writes it (the rows of all replicas concatenated)."""
        k_parts, replicas = self.layout.parts, self.layout.replicas
        copies = [[gathered[self.layout.rank_of(k, r)] for r in range(replicas)]
                  for k in range(k_parts)]
        parts = [merge_part_states([state for state, _ in c], batch_keys) for c in copies]
        mailboxes = [concat_shards([unused for _, unused in copies[k + 1]])
                     for k in range(k_parts - 1)] + [[]]
        return parts, {"mailboxes": mailboxes}

    def shard_checkpoint(self, state: Dict[str, Any], batch_keys: Sequence[str]
                         ) -> Dict[str, Any]:
        """A checkpoint (one pipeline's state, written with any R) cut to this replica's rows."""
        executor = dict(state["executor"])
        executor["mailboxes"] = [shard_tensors(box, self.layout) for box in executor["mailboxes"]]
        return {**state, "executor": executor,
                "parts": [shard_state(p, batch_keys, self.layout) for p in state["parts"]]}
