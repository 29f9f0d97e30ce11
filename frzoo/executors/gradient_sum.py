"""Summing the gradients of the R copies of one part across replicas, before each optimizer step.

Each replica's loss is its mean loss times its share of the global batch
(frzoo.executors.replicas.ShardLoss), so the sum is the gradient of the global batch's mean loss.
The sums go in buckets (:func:`plan_buckets`) launched from gradient hooks while the backward runs,
in bucket order (every copy issues the same collectives in the same order), the rest right before
the step (:class:`GradientSum`).

Why not DistributedDataParallel: its reducer pairs one backward with each forward of the wrapped
module, and fires its bucket hooks on that backward. Under Features Replay a part runs two
forwards per step (the play without a graph, the replay with one), under DDG it backpropagates a
graph built on a copy of the weights (its gradients are assigned, not accumulated, so no hook
fires) and the warm-up steps on zero gradients without any backward. `no_sync` and
`static_graph` do not describe that. frzoo's own hooks count the one backward of a step that
reaches the live weights, and where none does (DDG's parts but the last, the warm-up) every
bucket is summed right before the step: correct for all three algorithms and every warm-up mode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import FrzooError

#: what -> a context that turns a failed wait on the group into a PeerFailure (wire.Waiting)
WaitingFor = Callable[[str], ContextManager[Any]]


def no_naming(what: str) -> ContextManager[Any]:
    """The default WaitingFor: a failed wait stays what torch raised."""
    return contextlib.nullcontext()


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
class Launched:
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

    def __init__(self, algo: Any, group: Any, *, bucket_bytes: int, overlap: bool,
                 waiting: WaitingFor = no_naming) -> None:
        self.algo = algo
        self.group = group
        self.waiting = waiting  # names the copies waited for when a sum fails
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
        self.launched: List[Launched] = []
        self.found: Optional[Tensor] = None  # fp16: inf/NaN in the gradients unscaled so far

    def arm(self, count: bool = True) -> None:
        """A step begins: the hooks count its gradients from now on (`count`), or from
        :meth:`count_from_now`. (A backward with no step since the last arm, which no algorithm
        makes, leaves sums that are waited for and dropped: every copy does the same.)"""
        with self.waiting("the other replicas' gradient sums"):
            for launched in self.launched:
                launched.wait()
        self._reset()
        self.armed = count and bool(self.hooks)

    def count_from_now(self) -> None:
        """The backward that completes this step's gradients begins (a synchronous schedule's
        last micro-batch, frzoo.algorithms.pipelines): the hooks count from here, so each bucket
        is launched once, with the sum of all micro-batches, as it completes in that backward."""
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

    def _launch(self, b: int) -> Launched:
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
            return Launched(params, grads, [], torch.empty(0), None)
        flat = _flatten_dense_tensors(tensors)
        if len(tensors) == 1:  # that is a view of the gradient: the sum must not land in it
            flat = flat.clone()  # while the backward may still write it (see `changed`)
        with self.waiting("the other replicas' gradient sums"):  # a closed pair fails here
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        return Launched(params, grads, [g._version for g in grads], flat, work)

    def __call__(self, algo: Any) -> bool:
        """Before the step: launch what the backward did not, wait, copy the sums back. Returns
        whether to step (False only in fp16, when a copy overflowed)."""
        self.armed = False
        while len(self.launched) < len(self.buckets):
            self.launched.append(self._launch(len(self.launched)))
        with self.waiting("the other replicas' gradient sums"):
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
        with self.waiting("the other replicas' gradient sums"):
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
