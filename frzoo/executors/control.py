"""The control group: the few numbers the ranks of a job agree on besides the pipeline's messages.

Two things cross it: at the start of every run of steps, rank 0's answer to "did Ctrl-C ask to
stop?" (a one-number broadcast), and at each log point every rank's timings, gathered to the
leader. They go on a gloo group of their own (CPU tensors, whatever the parts' backend),
asynchronously on the ranks that do not need the answer: rank 0 posts the broadcast and goes on,
the others post their timings and go on, and only the ranks behind them (who are later anyway)
wait. On the default group, a blocking collective at every run's edge made rank 0 wait for the
last part to finish the run's last step, a pipeline drain every `train.log_every` steps.

A stop thus takes effect at the next run's start (at most `train.log_every` steps later) and no
stop message is ever needed on the wire.

With `train.trace`, the timeline's spans cross it too, once, after the trace window
(:meth:`ControlGroup.gather_objects`, a blocking gather: one drain, outside training time).
"""
from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .topology import Layout

#: (peer or None, what) -> a context that turns a failed wait into a PeerFailure (wire.Waiting)
WaitingFor = Callable[[Optional[int], str], Any]


class ControlGroup:
    """This rank's end of the control group (created in the constructor: a collective call, on
    every rank in the same order)."""

    def __init__(self, layout: Layout, timeout_s: Optional[float], waiting: WaitingFor) -> None:
        self.layout, self.waiting = layout, waiting
        self.group: Any = None
        if layout.world > 1:
            timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
            self.group = dist.new_group(backend="gloo", **timeout)
        self.works: List[Tuple[Any, Tensor]] = []  # (async work, its tensor) in flight

    def agree_stop(self, requested: bool) -> bool:
        """Rank 0's answer to "did Ctrl-C ask to stop?", broadcast at the start of every run.
        Rank 0 decides, so it does not wait for the others to hear it; they are behind it in the
        pipeline, so the answer is there when they ask."""
        flag = torch.tensor([int(requested)], dtype=torch.int64)
        if self.group is not None:
            self.retire()
            with self.waiting(None, "rank 0 to start a run of steps"):
                if self.layout.rank == 0:
                    self.works.append((dist.broadcast(flag, src=0, group=self.group,
                                                      async_op=True), flag))
                else:
                    dist.broadcast(flag, src=0, group=self.group)
        return bool(flag.item())

    def gather_timings(self, mine: Dict[str, float], keys: Sequence[str]
                       ) -> Optional[List[Dict[str, float]]]:
        """Every rank's timings (`mine`, read in `keys`) on the leader, replica-major; None
        elsewhere. The others hand theirs over without waiting (the leader, the last part, is
        the last to get here), so a log point does not drain the pipeline."""
        row = torch.tensor([mine.get(k, math.nan) for k in keys], dtype=torch.float64)
        if self.group is None:
            rows = [row]
        else:
            self.retire()
            leader = self.layout.rank == self.layout.leader
            rows = [torch.empty_like(row) for _ in range(self.layout.world)] if leader else None
            with self.waiting(None, "the other parts' timings"):
                work = dist.gather(row, rows, dst=self.layout.leader, group=self.group,
                                   async_op=not leader)
            if not leader:
                self.works.append((work, row))
                return None
            assert rows is not None
        return [{k: v for k, v in zip(keys, r.tolist()) if not math.isnan(v)} for r in rows]

    def gather_objects(self, obj: Any) -> Optional[List[Any]]:
        """`obj` of every rank on the leader (replica-major), None elsewhere; every rank waits
        for the leader (a drain: for what is gathered once per run, e.g. the trace)."""
        if self.group is None:
            return [obj]
        self.retire()
        leader = self.layout.rank == self.layout.leader
        out: Optional[List[Any]] = [None] * self.layout.world if leader else None
        with self.waiting(None, "the other parts' trace"):
            dist.gather_object(obj, out, dst=self.layout.leader, group=self.group)
        return out

    def retire(self, wait: bool = False) -> None:
        """Forget this rank's control messages that have arrived; with `wait`, wait for all of
        them first. Never waited for during training: the timings this rank handed to the
        leader arrive only once the leader, the last part, finishes the run's last step, and
        waiting for that here is the pipeline drain the control group exists to avoid."""
        if wait:
            with self.waiting(None, "the other parts to take this part's control messages"):
                for work, _ in self.works:
                    work.wait()
        self.works = [(w, t) for w, t in self.works if not w.is_completed()]

    def close(self) -> None:
        if self.group is not None:
            self.retire(wait=True)
