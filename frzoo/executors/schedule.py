"""What crosses between rank k and rank k+1 at step t, and when each side posts it.

Rank k runs part k+1 with exactly the per-part step the local executor calls; only the transport
differs (frzoo.executors.p2p runs the part, this module says what it sends and receives). With
data-parallel replicas (frzoo.executors.replicas) everything below holds inside each replica
(ranks r*K .. r*K+K-1, frzoo.executors.topology); what crosses replicas is not in this schedule.

The rules the schedule keeps (NCCL's; gloo is more lenient, and
tests/support/nccl_emulation.py holds gloo to them in the tests):

1. tags are ignored: the messages from one rank to another match in the order they are posted;
2. a rank's operations with one peer, sends and receives alike, run one after another in the
   order it posted them (one stream per pair of ranks);
3. a send may not complete before the peer has posted the matching receive.

So both ranks of a pair post that pair's operations in the same order, and a message's receive
is posted before the message is sent whenever possible (the transfer then overlaps computation).

The schedule of step t, per pair (both sides derive it from t, the data's batch sizes
(frzoo.data.DataModule.batch_rows) and the algorithm's expects_delta / sends_delta, so nothing
else crosses):

    rank 0   -> rank K-1   label t
    rank k   -> rank k+1   activation t                  (k = 0 .. K-2)
    rank k+1 -> rank k     delta(t): the delta part k+1 uses at step t, if it expects one

delta(t) is the one rank k+1 made at the end of its step t (a `synchronous` algorithm, bp) or of
step t-1 (the others, fr and ddg: the local executor's mailbox holds one delta between steps).
For K=2 the first two are the same pair and go in the order written: label t, activation t,
delta(t). Who posts what, and when:

- rank k, after its forward of step t: send activation t, then at once the receive of delta(t).
  The delta travels while part k replays; the algorithm is handed a function that waits for it,
  called right before the backward (frzoo.algorithms.base.arrived).
- rank k+1 posts the receive of activation t (and, the leader, of label t) as soon as everything
  before it on the pair is posted, i.e. once it has made delta(t-1): at the end of step t-2 (fr)
  or t-1 (bp), at most two steps ahead. It posts the send of delta(t) right after the receive of
  activation t, or as soon as it has made it. Under fr, activation t+1 is thus in flight while
  rank k+1 computes step t.
- the label of step t is sent by rank 0 when it takes the batch, before its forward.

Why this cannot deadlock when every send waits for its receive: on each pair both sides post
the same sequence (label t,) activation t, delta(t), t = t0, t0+1, ..., so the i-th operation on
one side meets the i-th on the other (rule 1: each receive gets its message; rules 2-3: the
heads of the two queues always match). Each operation is posted after computation that waits
only for messages that come earlier in the schedule: activation t needs activation t from the
part before (earlier rank, same t); delta(t) needs the delta the part after made at step t (bp:
a later rank, down to the last part, which needs none) or at step t-1 (fr, ddg: an earlier
step). By induction over (t, rank) every operation is posted, so every one completes. The old
schedule broke rule 2: rank k sent activation t+1 and then took delta(t), while rank k+1 had
posted the send of delta(t) before the receive of activation t+1: two sends, each waiting.

Runs of steps. Training goes in runs: the steps between two points where the trainer does
anything else with the pipeline (a log point, an epoch's end, the end; the trainer passes the
run's end as `horizon`). Receives are posted ahead only within a run, so at its end nothing is in
flight; evaluation and checkpoints see an idle pipeline (checkpoints may also fall inside a run:
they are collectives, not point-to-point). A run starts with rank 0's stop flag on the control
group (frzoo.executors.control).

Evaluation (:meth:`PairSchedule.evaluate`), between runs: test batch b crosses as evaluation
labels b (rank 0 -> rank K-1) and evaluation activation b (rank k -> rank k+1); no delta. Each
replica evaluates every R-th test batch from its own index (frzoo.data.DataModule.test_batches);
the receives of the next batch are posted one batch ahead.

fp16 (frzoo.loss_scale). Every activation and every delta is followed, on the same pair, by one
float64 number: an activation by the overflow report of the parts up to its sender, a delta by
the loss scale that produced it. Both sides post it right after the payload it belongs to, so the
schedule above keeps its order; other precisions send nothing more.

Shapes: a receive is posted before its message exists; frzoo.executors.codec says how its shape
is predicted and how several tensors crossing one cut travel as one message.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..activation import Deltas, detached
from ..algorithms.base import PartAlgorithm
from ..loss_scale import NO_OVERFLOW
from .base import EvalTotals, eval_forward
from .codec import ACT, DELTA, EVAL_ACT, EVAL_LABEL, LABEL
from .topology import Layout
from .wire import Incoming, Wire

Input = Tuple[Any, Any, Optional[float]]  # (activation or data, labels or None, fp16 report)


class PairSchedule:
    """One rank's side of the schedule with its two neighbours (the module docstring)."""

    def __init__(self, algo: PartAlgorithm, layout: Layout, wire: Wire) -> None:
        self.algo, self.layout, self.wire = algo, layout, wire
        self.rank, self.world = layout.rank, layout.parts
        self.lag = 0 if algo.synchronous else 1  # delta(t) is made at step t - lag
        self.scaled = algo.scaler is not None  # fp16: a number follows each act./delta
        self.data: Any = None  # the batch sizes predict every message's shape
        # Deltas made for the previous part that it has not used yet, as (step it uses it at,
        # delta), oldest first: sent or still to send; a checkpoint stores them as its mailbox.
        self.outbox: Deque[Tuple[int, Deltas]] = deque()
        self.outbox_scales: Dict[int, float] = {}  # fp16: the loss scale of each outbox delta
        self.last_sent = -1  # the step whose delta was sent last
        self.inbox: Dict[Tuple[int, int], Incoming] = {}  # posted receives by (kind, step)
        self.tick = 0  # steps and evaluation batches done: sends older than world+1 are retired
        self.run_end: Optional[int] = None  # the end of the current run of steps; None: idle
        self.posted = 0  # the first step whose receives are not posted yet
        self.finished = -1  # the last step done

    def rows(self, step: int) -> int:
        """The rows of training step `step` in this replica: its share of the global batch."""
        return self.data.shard_size(step, self.layout.replica, self.layout.replicas)

    # -- a run of steps
    def start_run(self, step: int, end: int) -> None:
        self.run_end, self.finished, self.posted, self.last_sent = end, step - 1, step, step - 1
        self.post_ahead()

    def post_ahead(self) -> None:
        """Post, on the pair with the previous rank, all the schedule allows now: the receives
        of the next steps of the run (at most two steps ahead), each followed by the delta the
        previous part uses at that step, once made."""
        while True:
            for slot, delta in self.outbox:
                if self.last_sent < slot < self.posted:
                    rows = self.rows(slot - type(self.algo).staleness_of(self.algo.index - 1,
                                                                         self.world))
                    self.wire.send(DELTA, self.rank - 1, delta, rows, self.tick,  # every tensor's
                                   self.outbox_scales.get(slot))                  # delta
                    self.last_sent = slot
            t = self.posted
            made = t - 1 - self.lag  # the step that makes the delta sent just before step t's receives
            assert self.run_end is not None
            if t >= self.run_end or t > self.finished + 2 \
                    or (made > self.finished and self.algo.sends_delta(made)):
                return
            rows = self.rows(t)
            if self.layout.is_last and not self.layout.is_first:
                self.inbox[(LABEL, t)] = self.wire.expect(LABEL, self.layout.rank_of(0), rows)
            if not self.layout.is_first:
                self.inbox[(ACT, t)] = self.wire.expect(ACT, self.rank - 1, rows, self.scaled)
            self.posted = t + 1

    # -- one step, in the order the part runs it
    def take_input(self, batch: Any, step: int) -> Input:
        """The part's input of step `step`: the batch (rank 0, which sends its labels on to the
        last part now) or the activation from the previous rank, the labels on the last part,
        and in fp16 the overflow report that rode up with the activation."""
        if self.layout.is_first:
            assert batch is not None
            h, target = batch
            if self.world > 1:
                self.wire.send(LABEL, self.layout.rank_of(self.world - 1), (target,),
                               self.rows(step), self.tick)
            return (h,), target, NO_OVERFLOW
        incoming = self.inbox.pop((ACT, step))
        h = incoming.take()
        report = incoming.side_value() if self.scaled else None
        target = self.inbox.pop((LABEL, step)).take()[0] if self.layout.is_last else None
        return h, target, report

    def send_output(self, step: int, output: Any, report: Optional[float]) -> None:
        if not self.layout.is_last:
            self.wire.send(ACT, self.rank + 1, output, self.rows(step), self.tick,
                           report if self.scaled else None)

    def delta_taker(self, step: int) -> Optional[Callable[[], Tuple[Any, ...]]]:
        """Post the receive of delta(step) if the part expects one (it travels while the part
        replays) and return what the algorithm calls for it: waits for it and, in fp16, hands
        the part's loss scaler the delta and the scale that came with it (once)."""
        algo = self.algo
        if not algo.expects_delta(step):
            return None
        incoming = self.wire.expect(DELTA, self.rank + 1, self.rows(step - algo.staleness),
                                    self.scaled)

        def take() -> Tuple[Any, ...]:
            first = incoming.tensors is None
            delta = incoming.take()
            if first and algo.scaler is not None:
                algo.scaler.receive(delta, incoming.side_value())
            return delta
        return take

    def finish_step(self, step: int, grad_in: Any) -> None:
        """After the backward: keep the delta made for the previous part, post what that allows,
        forget what is sent and used, retire old sends, and end the run at its last step."""
        algo = self.algo
        if algo.sends_delta(step):
            assert grad_in is not None, f"{self.layout.name()} promised a delta at step {step}"
            self.outbox.append((step + self.lag, detached(grad_in)))
            if algo.scaler is not None:  # the scale of the delta it used goes down with it
                self.outbox_scales[step + self.lag] = algo.scaler.delta_scale  # type: ignore[assignment]
        self.finished = step
        self.post_ahead()
        while self.outbox and self.outbox[0][0] <= min(self.last_sent, step):
            slot, _ = self.outbox.popleft()  # sent, and used by the previous part at a step done now
            self.outbox_scales.pop(slot, None)
        self.advance()
        if step + 1 >= self.run_end:  # type: ignore[operator]
            self.end_run()

    def advance(self) -> None:
        """One step or test batch done: sends older than world + 1 of them are retired."""
        self.tick += 1
        self.wire.retire(self.tick - self.world - 1)

    def end_run(self) -> None:
        self.wire.retire(math.inf)
        assert not self.inbox, f"receives left posted at the end of a run: {sorted(self.inbox)}"
        self.run_end = None

    # -- evaluation through the same pipeline (eval mode, no history), between runs
    def evaluate(self, data: Any) -> EvalTotals:
        """This replica's test batches through the pipeline; the totals (on the last part)."""
        totals = EvalTotals()
        replica, replicas = self.layout.replica, self.layout.replicas
        if self.layout.is_first:
            for x, y in data.test_batches(replica, replicas):
                if self.world > 1:
                    self.wire.send(EVAL_LABEL, self.layout.rank_of(self.world - 1), (y,), len(y),
                                   self.tick)
                h = eval_forward(self.algo, x)
                if self.layout.is_last:
                    totals.add(h, y)
                else:
                    self.wire.send(EVAL_ACT, self.rank + 1, h, len(y), self.tick)
                self.advance()
        else:
            self._evaluate_received(data.test_batch_rows(replica, replicas), totals)
        self.wire.retire(math.inf)
        return totals

    def _evaluate_received(self, sizes: Sequence[int], totals: EvalTotals) -> None:
        posted = 0
        for b in range(len(sizes)):
            while posted < min(b + 2, len(sizes)):  # the next batch's receives, ahead
                if self.layout.is_last:
                    self.inbox[(EVAL_LABEL, posted)] = self.wire.expect(
                        EVAL_LABEL, self.layout.rank_of(0), sizes[posted])
                self.inbox[(EVAL_ACT, posted)] = self.wire.expect(EVAL_ACT, self.rank - 1,
                                                                  sizes[posted])
                posted += 1
            out = eval_forward(self.algo, self.inbox.pop((EVAL_ACT, b)).take())
            if self.layout.is_last:
                totals.add(out, self.inbox.pop((EVAL_LABEL, b)).take()[0])
            else:
                self.wire.send(EVAL_ACT, self.rank + 1, out, sizes[b], self.tick)
            self.advance()

    # -- checkpoints: the outbox is the previous part's mailbox
    def unused_deltas(self, next_step: int) -> Tuple[List[Deltas], List[float]]:
        """The deltas this part made that the previous part has not used (sent or not: they are
        the state its next steps depend on), and in fp16 their scales."""
        unused = [d for slot, d in self.outbox if slot >= next_step]
        scales = [self.outbox_scales[slot] for slot, _ in self.outbox if slot >= next_step] \
            if self.scaled else []
        return unused, scales

    def load_mailbox(self, next_step: int, mailbox: Sequence[Deltas],
                     scales: Sequence[float]) -> None:
        """The previous part's mailbox, to send again: it uses them at its next steps."""
        self.outbox = deque((next_step + i, d) for i, d in enumerate(mailbox))
        if self.scaled:
            self.outbox_scales = {next_step + i: s for i, s in enumerate(scales)}
