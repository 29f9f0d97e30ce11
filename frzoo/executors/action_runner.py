"""One rank's step of a synchronous schedule (gpipe, 1f1b, zb1) over torch.distributed.

The rank runs its part's list of actions (frzoo.algorithms.actions) for the step. With each
neighbour it exchanges the step's messages in the order the shared simulation made them
(:func:`frzoo.algorithms.actions.pair_messages`), under NCCL's rules (frzoo.executors.schedule):

- the leader's labels of the step come first on the pair (rank 0, rank K-1), sent whole;
- a receive is posted as soon as everything before it on its pair is posted (so the transfer
  overlaps computation), a send right after the action that made it;
- micro-batch m's activation travels rank k -> k+1 after F m, its delta rank k+1 -> k after
  B m or I m; in fp16 an activation carries the overflow report (frzoo.loss_scale) and a delta
  the loss scale, one number after the payload, as in the Features Replay schedule.

A step drains the pipeline: nothing is posted ahead into the next step, so checkpoints and
evaluation find it idle. Both ranks of a pair derive the order from (K, M, schedule) alone.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from ..activation import to_device
from ..algorithms.actions import (BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Message,
                                  pair_messages, simulate)
from ..algorithms.base import ForwardResult, PartAlgorithm
from ..loss_scale import NO_OVERFLOW
from .base import micro_batches
from .codec import ACT, DELTA, LABEL
from .topology import Layout
from .wire import Incoming, Wire

KINDS = {"act": ACT, "delta": DELTA, "label": LABEL}


class ActionRunner:
    """This rank's side of one synchronous step (the module docstring)."""

    def __init__(self, algo: PartAlgorithm, layout: Layout, wire: Wire, pairs: Any) -> None:
        self.algo, self.layout, self.wire, self.pairs = algo, layout, wire, pairs
        self.microbatches: int = algo.microbatches  # type: ignore[attr-defined]
        self.scaled = algo.scaler is not None
        num, k = layout.parts, layout.part
        order = simulate(type(algo).schedule(num, self.microbatches))  # type: ignore[attr-defined]
        self.actions = [a for part, a in order if part == k]
        # per neighbouring part: the messages of the pair, in the order both sides post them
        self.plan: Dict[int, List[Message]] = {}
        if k > 0:
            self.plan[k - 1] = pair_messages(order, num, k - 1)
        if k < num - 1:
            self.plan[k + 1] = pair_messages(order, num, k)
        if num > 1 and k in (0, num - 1):  # the labels go first on the pair of the ends
            label = Message("label", 0, 0, num - 1)
            self.plan[num - 1 - k] = [label] + self.plan.get(num - 1 - k, [])
        self.run_end: Optional[int] = None

    def start_run(self, step: int, end: int) -> None:
        self.run_end = end

    def step(self, batch: Any, step: int) -> ForwardResult:
        """Run this part's actions of step `step`; the last part returns the step's result."""
        algo, m_count = self.algo, self.microbatches
        rows = self.pairs.rows(step)
        self.queues: Dict[int, Deque[Message]] = {p: deque(ms) for p, ms in self.plan.items()}
        self.posted: Dict[Tuple[str, int], Incoming] = {}
        self.micro_rows = rows // m_count
        inputs = targets = None
        if self.layout.is_first:
            inputs, targets = micro_batches(batch, m_count)
            if self.layout.parts > 1:
                self._send(self.layout.parts - 1, "label", 0, (batch[1],), rows)
        for part in self.queues:
            self._post_receives(part)
        if self.layout.is_last and not self.layout.is_first:
            labels = self._take("label", 0)[0][0].to(algo.device)
            targets = labels.chunk(m_count)
        report = NO_OVERFLOW
        result = ForwardResult()
        for action in self.actions:
            m = action.micro
            if action.kind == FORWARD:
                report = self._forward(step, m, inputs, targets, report)
            elif action.kind in (BACKWARD, INPUT_GRAD):
                self._backward(step, m, action.kind)
            elif action.kind == WEIGHT_GRAD:
                algo.weight_backward(step, m)  # type: ignore[attr-defined]
            else:
                result = algo.update(step)  # type: ignore[attr-defined]
        assert not self.posted, f"receives left at the end of step {step}: {sorted(self.posted)}"
        self.pairs.advance()  # retires sends world + 1 steps old
        if self.run_end is not None and step + 1 >= self.run_end:
            self.wire.retire(math.inf)
            self.run_end = None
        return result

    # -- the actions that move messages
    def _forward(self, step: int, m: int, inputs: Any, targets: Any, report: float) -> float:
        algo, k = self.algo, self.layout.part
        if self.layout.is_first:
            h, below = (inputs[m],), NO_OVERFLOW
        else:
            h, below = self._take("act", m)
        if algo.scaler is not None and m == 0:
            report = algo.scaler.pass_up(below, step)
        target = targets[m].to(algo.device) if self.layout.is_last else None
        out = algo.micro_forward(to_device(h, algo.device), target, step, m)  # type: ignore[attr-defined]
        if out is not None:
            self._send(k + 1, "act", m, out, self.micro_rows, report if self.scaled else None)
        return report

    def _backward(self, step: int, m: int, kind: str) -> None:
        algo, k = self.algo, self.layout.part
        delta = None
        if not self.layout.is_last:
            delta, scale = self._take("delta", m)
            if algo.scaler is not None:
                algo.scaler.receive(delta, scale, more=m > 0)
        run = algo.micro_backward if kind == BACKWARD else algo.input_backward  # type: ignore[attr-defined]
        grad_in = run(delta, step, m)
        if k > 0:
            scale = algo.scaler.delta_scale if algo.scaler is not None else None
            self._send(k - 1, "delta", m, grad_in, self.micro_rows, scale)

    # -- the pair's order
    def _send(self, part: int, kind: str, m: int, values: Any, rows: int,
              side: Optional[float] = None) -> None:
        queue = self.queues[part]
        head = queue.popleft()
        assert (head.kind, head.micro) == (kind, m), f"sent {kind} {m} before {head}"
        self.wire.send(KINDS[kind], self.layout.rank_of(part), values, rows, self.pairs.tick,
                       side)
        self._post_receives(part)

    def _post_receives(self, part: int) -> None:
        """Post the receives at the head of the pair's order (up to this rank's next send)."""
        queue = self.queues[part]
        while queue and queue[0].receiver == self.layout.part:
            msg = queue.popleft()
            rows = self.micro_rows * (self.microbatches if msg.kind == "label" else 1)
            side = self.scaled and msg.kind != "label"
            self.posted[(msg.kind, msg.micro)] = self.wire.expect(
                KINDS[msg.kind], self.layout.rank_of(part), rows, side)

    def _take(self, kind: str, m: int) -> Tuple[Any, Optional[float]]:
        incoming = self.posted.pop((kind, m))
        values = incoming.take()
        side = incoming.side_value() if self.scaled and kind != "label" else None
        return values, side
