"""Data-parallel replicas of the K-part pipeline (`distributed.replicas: R`).

R x K processes. The rank layout is replica-major: rank = r * K + k runs part k+1 of replica r,
so a replica's parts are consecutive ranks (under torchrun, on one node: activations and deltas
stay on its fast links) and only the copies of one part, which sit K ranks apart, talk across
replicas. Point-to-point messages stay inside a replica (frzoo.executors.p2p); what crosses
replicas goes through one process group per part (:func:`part_groups`), with torch's collectives:

- gradients: the R copies of part k all-reduce (sum) their gradients before each optimizer step
  (:class:`GradientSum`, the algorithm's `sum_gradients`), in buckets launched from gradient
  hooks while the backward runs, in bucket order (every copy issues the same collectives in the
  same order), the rest right before the step. Each replica's loss is its mean loss times its
  share of the global batch (:class:`ShardLoss`), so the sum is the gradient of the global
  batch's mean loss, and every delta a part sends down is the delta of the global batch's loss
  for its rows: the messages, histories and mailboxes of R replicas concatenated are those of
  one pipeline, which is what makes a checkpoint independent of R (:func:`merge_part_states`,
  :func:`shard_state`). In fp16 the buckets are unscaled before they are summed and carry each
  copy's overflow flag, so the copies step or skip together.

  Why not DistributedDataParallel: its reducer pairs one backward with each forward of the
  wrapped module, and fires its bucket hooks on that backward. Under Features Replay a part runs
  two forwards per step (the play without a graph, the replay with one), under DDG it
  backpropagates a graph built on a copy of the weights (its gradients are assigned, not
  accumulated, so no hook fires) and the warm-up steps on zero gradients without any backward.
  `no_sync` and `static_graph` do not describe that. frzoo's own hooks count the one backward
  of a step that reaches the live weights, and where none does (DDG's parts but the last, the
  warm-up) every bucket is summed right before the step: correct for all three algorithms and
  every warm-up mode.
- BatchNorm (`distributed.sync_bn`): :class:`GroupBatchNorm` all-reduces the per-channel sums
  with the part's group, in the play and the replay alike (and back through the backward).
  torch's SyncBatchNorm refuses CPU tensors in this torch version (it needs a GPU), so the
  synchronisation is written with a differentiable dist.all_reduce instead (:class:`_GroupSum`).
- metrics: the last parts' loss, logits and targets are gathered to the leader (replica 0's last
  part), evaluation totals are summed there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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


#: Launch each bucket's all-reduce from gradient hooks while the backward runs (True), or every
#: bucket right before the step (False): the same sums, bit for bit; the tests compare the two.
OVERLAP = True


def plan_buckets(parameters: Sequence[nn.Parameter], bucket_bytes: int) -> List[List[int]]:
    """The parameters (their indices) of each bucket, in launch order: reverse registration
    order, as DDP does, since a backward produces the last layers' gradients first; at most
    `bucket_bytes` each (a larger parameter alone), one dtype and device per bucket."""
    buckets: List[List[int]] = []
    size = 0
    for i in reversed(range(len(parameters))):
        p = parameters[i]
        nbytes = p.numel() * p.element_size()
        head = parameters[buckets[-1][0]] if buckets else None
        if head is None or size + nbytes > bucket_bytes or head.dtype != p.dtype \
                or head.device != p.device:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


@dataclass
class _Launched:
    """One bucket's all-reduce in flight: the parameters that had a gradient, those gradients
    and their version counters when flattened (to tell a gradient changed since), the flat sum."""
    params: List[nn.Parameter]
    grads: List[Tensor]
    versions: List[int]
    flat: Tensor
    work: Any

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()

    def changed(self, bucket: Sequence[nn.Parameter]) -> bool:
        """Whether a gradient of the bucket changed after it was flattened (a second
        accumulation, a replaced or new gradient): its sum is then stale."""
        have = {id(p) for p in self.params}
        return any(p.grad is not g or g._version != v
                   for p, g, v in zip(self.params, self.grads, self.versions)) \
            or any(p.grad is not None for p in bucket if id(p) not in have)


class GradientSum:
    """Sums the gradients of the R copies of one part before its optimizer step (the
    algorithm's `sum_gradients`): buckets of at most `bucket_bytes` (:func:`plan_buckets`),
    each flattened and all-reduced asynchronously over the part's group, waited for before the
    step and copied back into the gradients.

    Overlap (`overlap`): a hook on each parameter (register_post_accumulate_grad_hook) counts
    the gradients accumulated since the step began (:meth:`arm`, every step before the
    forward); a bucket whose gradients are all there is launched during the backward, strictly
    in bucket order (a complete bucket waits for the lower ones: every copy must issue its
    collectives on the group in the same order, NCCL's rule). What no hook completes is
    launched at the step, in order: the after-backward path, which is where these fall back:
    - `ddg`'s parts but the last: their graph is built on copies of the weights and the
      gradients are assigned after the backward, so no hook fires on the live parameters;
    - the `zeros` warm-up (a zero gradient, no backward);
    - a bucket holding a parameter without a gradient this step (unused in the graph, frozen),
      and every bucket after it.
    A gradient changed after its bucket was flattened (a second backward in one step) makes the
    bucket stale: it is all-reduced again at the step, after the others, on every copy alike.
    Parameters whose gradient is None are left out of the sums and keep None (every copy runs
    the same graph, so they agree); a bucket with no gradient at all is not sent.

    fp16 (the part's LossScaler): each bucket's gradients are unscaled (the scale of the delta
    that made them, frzoo.loss_scale) right before they are flattened, as one process unscales
    before its step, and the last bucket carries one more number: 1 when this copy's gradients
    or received delta hold inf/NaN. Summed, every copy reads the same flag and all of them step
    or all skip, so their scalers, and the overflow reports riding up each replica, stay equal.
    """

    def __init__(self, algo: Any, group: Any, *, bucket_bytes: int, overlap: bool) -> None:
        self.algo = algo
        self.group = group
        self.params: List[nn.Parameter] = list(algo.part.parameters())
        self.buckets = plan_buckets(self.params, bucket_bytes)
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.hooks = [p.register_post_accumulate_grad_hook(partial(self._accumulated, i))
                      for i, p in enumerate(self.params) if overlap and p.requires_grad]
        self.hooked = [bool(self.hooks) and p.requires_grad for p in self.params]
        self.armed = False
        self._reset()

    def _reset(self) -> None:
        self.seen = [False] * len(self.params)
        self.missing = [sum(self.hooked[i] for i in bucket) for bucket in self.buckets]
        self.launched: List[_Launched] = []
        self.found: Optional[Tensor] = None  # fp16: inf/NaN in the gradients unscaled so far

    def arm(self) -> None:
        """A step begins: the hooks count its gradients from now on. (A backward with no step
        since the last arm, which no algorithm makes, leaves sums that are waited for and
        dropped: every copy does the same.)"""
        for launched in self.launched:
            launched.wait()
        self._reset()
        self.armed = bool(self.hooks)

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks, self.armed = [], False

    def _accumulated(self, index: int, _param: Tensor) -> None:
        """The hook: parameter `index`'s gradient is complete for this backward."""
        if not self.armed or self.seen[index]:
            return  # outside a step, or a second accumulation: stale, redone at the step
        self.seen[index] = True
        self.missing[self.bucket_of[index]] -= 1
        while len(self.launched) < len(self.buckets) and self.missing[len(self.launched)] == 0:
            self.launched.append(self._launch(len(self.launched)))

    def _launch(self, b: int) -> _Launched:
        """Flatten bucket `b`'s gradients (fp16: unscaled first; the last bucket with the
        overflow flag) and start their all-reduce."""
        params = [self.params[i] for i in self.buckets[b] if self.params[i].grad is not None]
        grads: List[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        tensors = list(grads)
        scaler = self.algo.scaler
        if scaler is not None:
            found = scaler.unscale_grads(grads)
            if found is not None:
                self.found = found if self.found is None else self.found | found
            if b == len(self.buckets) - 1:  # this copy's overflow flag rides in the last bucket
                head = self.params[self.buckets[b][0]]
                bad = scaler.overflowed(self.found)
                tensors.append(torch.zeros(1, dtype=head.dtype, device=head.device) if bad is None
                               else bad.to(head.dtype).reshape(1))
        if not tensors:  # no gradient in this bucket this step, on any copy: nothing to send
            return _Launched(params, grads, [], torch.empty(0), None)
        flat = _flatten_dense_tensors(tensors)
        if len(tensors) == 1:  # that is a view of the gradient: the sum must not land in it
            flat = flat.clone()  # while the backward may still write it (see `changed`)
        return _Launched(params, grads, [g._version for g in grads], flat,
                         dist.all_reduce(flat, group=self.group, async_op=True))

    def __call__(self, algo: Any) -> bool:
        """Before the step: launch what the backward did not, wait, copy the sums back. Returns
        whether to step (False only in fp16, when a copy overflowed)."""
        self.armed = False
        while len(self.launched) < len(self.buckets):
            self.launched.append(self._launch(len(self.launched)))
        for launched in self.launched:
            launched.wait()
        stale = [b for b, launched in enumerate(self.launched)
                 if launched.changed([self.params[i] for i in self.buckets[b]])]
        if stale and algo.scaler is not None:
            raise FrzooError(
                f"a gradient of part {algo.index + 1} changed after its bucket was unscaled and "
                f"all-reduced (a second backward in one step?): with train.precision=fp16 and "
                f"distributed.replicas the gradients are unscaled as each bucket completes, so "
                f"each may be accumulated once per step. Use train.precision=bf16, or one "
                f"backward per optimizer step.")
        for b in stale:  # every copy finds the same buckets stale: sum them again, in order
            self.launched[b] = self._launch(b)
        for b in stale:
            self.launched[b].wait()
        for launched in self.launched:
            for g, summed in zip(launched.grads,
                                 _unflatten_dense_tensors(launched.flat, launched.grads)):
                g.copy_(summed)
        finite = True
        if algo.scaler is not None:  # one read of the device per step, as in one process
            finite = algo.scaler.settle(not bool(self.launched[-1].flat[-1] > 0))
        self._reset()
        return finite


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
        self.grads: Optional[GradientSum] = None

    @classmethod
    def join(cls, algo: Any, layout: Layout, groups: Sequence[Any], *, sync_bn: bool) -> "Replica":
        """Make `algo` one copy of its part: gradients summed over the copies before each step,
        the last part's loss weighted by the shard's share, its own dropout seed, and (sync_bn)
        BatchNorm over the global batch."""
        replica = cls(algo, layout, groups)
        if sync_bn:
            sync_batch_norm(algo.part, replica.group)
        replica.grads = algo.sum_gradients = GradientSum(algo, replica.group,
                                                         bucket_bytes=BUCKET_BYTES, overlap=OVERLAP)
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
        if self.grads is not None:
            self.grads.arm()  # the gradient hooks count this step's backward

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
