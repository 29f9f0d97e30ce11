"""Data-parallel replicas of the K-part pipeline (`distributed.replicas: R`): one rank's duties.

R x K processes, laid out replica-major (frzoo.executors.topology): rank = r * K + k runs part k+1
of replica r. Point-to-point messages stay inside a replica (frzoo.executors.schedule); what
crosses replicas goes through one process group per part (topology.part_groups), with torch's
collectives. :class:`Replica` is what one rank does there, called by the distributed executor at
the points where the copies of its part meet:

- gradients: the R copies of part k sum their gradients before each optimizer step
  (frzoo.executors.gradient_sum.GradientSum, the algorithm's `sum_gradients`). Each replica's
  loss is its mean loss times its share of the global batch (:class:`ShardLoss`), so the sum is
  the gradient of the global batch's mean loss, and every delta a part sends down is the delta of
  the global batch's loss for its rows: the messages, histories and mailboxes of R replicas
  concatenated are those of one pipeline, which is what makes a checkpoint independent of R
  (frzoo.executors.shards, frzoo.executors.part_state). In fp16 the buckets are unscaled before they are summed and carry
  each copy's overflow flag, so the copies step or skip together.
- BatchNorm (`distributed.sync_bn`): frzoo.executors.sync_bn.
- metrics: the last parts' loss, logits and targets are gathered to the leader (replica 0's last
  part), evaluation totals are summed there.
- each replica's dropout/drop-path masks have their own seed (:func:`replica_seed`).

How many rows each replica's share of a batch has is the data module's answer
(frzoo.data.DataModule.shard_sizes).
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..algorithms.base import ForwardResult
from .gradient_sum import GradientSum
from .shards import shard_state, shard_tensors
from .sync_bn import broadcast_buffers, sync_batch_norm
from .topology import Layout
from .wire import Waiting

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket size
#: Launch each bucket's all-reduce from gradient hooks while the backward runs (True), or every
#: bucket right before the step (False): the same sums, bit for bit; the tests compare the two.
OVERLAP = True


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


# ---------------------------------------------------------------- metrics
def collective_device(group: Any, device: torch.device) -> torch.device:
    """Where a gather/reduce's tensors must be: NCCL takes the GPU's, gloo CPU tensors only."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather_train_result(loss: Tensor, logits: Tensor, target: Tensor, group: Any, layout: Layout,
                        rows: Sequence[int]) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """The last parts' (loss, logits, targets) of one step, gathered to the leader: the summed
    loss (the global batch's mean loss: see ShardLoss) and the rows in replica order, i.e. the
    global batch. `rows` are every replica's row counts. None on the other ranks."""
    width = logits.shape[1] + 2
    packed = torch.zeros(max(rows), width, dtype=torch.float32,
                         device=collective_device(group, logits.device))
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
                          dtype=torch.float64, device=collective_device(group, device))
    dist.reduce(values, dst=layout.leader, group=group)
    # num_classes: the leader's own (replica 0 always evaluates the first test batch)
    totals.loss, totals.top1, totals.top5, totals.count = (float(v) for v in values)


# ---------------------------------------------------------------- one rank's replica duties
class Replica:
    """What one rank of a replicated job does beyond its pipeline's messages: the distributed
    executor calls it at the points where the copies of its part meet (see the module
    docstring). `join` wires it into the part's algorithm."""

    def __init__(self, algo: Any, layout: Layout, groups: Sequence[Any],
                 timeout_s: Optional[float] = None) -> None:
        self.algo, self.layout, self.timeout_s = algo, layout, timeout_s
        self.group = groups[layout.part]  # the R copies of this rank's part
        self.src = layout.rank_of(layout.part, 0)  # this part's copy in replica 0
        self.loss: Optional[ShardLoss] = None
        self.grads: Optional[GradientSum] = None

    @classmethod
    def join(cls, algo: Any, layout: Layout, groups: Sequence[Any], *, sync_bn: bool,
             timeout_s: Optional[float] = None) -> "Replica":
        """Make `algo` one copy of its part: gradients summed over the copies before each step,
        the last part's loss weighted by the shard's share, its own dropout seed, and (sync_bn)
        BatchNorm over the global batch. `timeout_s` (distributed.timeout_s) words the error
        when a copy stops answering."""
        replica = cls(algo, layout, groups, timeout_s)
        if sync_bn:
            sync_batch_norm(algo.part, replica.group, replica.waiting)
        replica.grads = algo.sum_gradients = GradientSum(
            algo, replica.group, bucket_bytes=BUCKET_BYTES, overlap=OVERLAP,
            waiting=replica.waiting)
        algo.seed = replica_seed(algo.seed, layout.replica)
        if algo.is_last:
            replica.loss = algo.loss_fn = ShardLoss(algo.loss_fn)
        return replica

    def waiting(self, what: str) -> ContextManager[Any]:
        """A failed wait on the part's group becomes a PeerFailure naming this rank and `what`."""
        return Waiting(self.layout.name(), f"the other copies of part {self.layout.part + 1}",
                       None, what, self.timeout_s)

    def before_step(self, rows: int, global_rows: int) -> None:
        if self.loss is not None:
            self.loss.share = rows / global_rows
        if self.grads is not None:
            # the gradient hooks count this step's backward (a synchronous schedule's last one)
            self.grads.arm(count=not self.algo.runs_actions)

    def gather_result(self, result: Any, rows: Sequence[int]) -> Any:
        """The step's ForwardResult for the global batch on the leader (`rows`: every replica's
        rows of it); None elsewhere."""
        with self.waiting("the step's losses and logits"):
            gathered = gather_train_result(result.loss, result.logits, result.target,
                                           self.group, self.layout, rows)
        if gathered is None:
            return None
        loss, logits, target = gathered
        return ForwardResult(loss=loss, logits=logits, target=target)

    def reduce_eval(self, totals: Any) -> None:
        with self.waiting("the evaluation totals"):
            reduce_eval_totals(totals, self.group, self.layout, self.algo.device)

    def share_buffers(self) -> None:
        with self.waiting("replica 0's buffers"):
            broadcast_buffers(self.algo.part, self.group, self.src)

    def shard_checkpoint(self, state: Dict[str, Any], batch_keys: Sequence[str]
                         ) -> Dict[str, Any]:
        """A checkpoint (one pipeline's state, written with any R) cut to this replica's rows."""
        executor = dict(state["executor"])
        executor["mailboxes"] = [shard_tensors(box, self.layout) for box in executor["mailboxes"]]
        return {**state, "executor": executor,
                "parts": [shard_state(p, batch_keys, self.layout) for p in state["parts"]]}
