"""The transport between parts in separate processes (torch.distributed point-to-point).

Rank k runs part k+1 with exactly the per-part step the local executor calls; only the transport
differs. The last rank (which has the loss) is the leader: it logs and writes files. Processes
are started and supervised by frzoo.executors.launch; this module only moves tensors. With
data-parallel replicas (`distributed.replicas`, frzoo.executors.replicas) rank r*K + k runs part
k+1 of replica r: everything below holds inside each replica (ranks r*K .. r*K+K-1), the leader
is replica 0's last part, and what crosses replicas is left to frzoo.executors.replicas.

The rules the schedule keeps (NCCL's; gloo is more lenient, and tests/support/nccl_emulation.py
holds gloo to them in the tests):

1. tags are ignored: the messages from one rank to another match in the order they are posted;
2. a rank's operations with one peer, sends and receives alike, run one after another in the
   order it posted them (one stream per pair of ranks);
3. a send may not complete before the peer has posted the matching receive.

So both ranks of a pair post that pair's operations in the same order, and a message's receive
is posted before the message is sent whenever possible (the transfer then overlaps computation).

Runs of steps. Training goes in runs: the steps between two points where the trainer does
anything else with the pipeline (a log point, an epoch's end, the end; the trainer passes the
run's end as `horizon`). Receives are posted ahead only within a run, so at its end nothing is in
flight; evaluation and checkpoints see an idle pipeline (checkpoints may also fall inside a run:
they are collectives, not point-to-point). A run starts with a one-number broadcast from rank 0:
whether Ctrl-C asked it to stop, so a stop takes effect at the next run's start (at most
`train.log_every` steps later) and no stop message is ever needed on the wire.

The control group. That broadcast and the timings gathered to the leader at each log point go on
a gloo group of their own (CPU tensors, whatever the parts' backend), asynchronously on the ranks
that do not need the answer: rank 0 posts the broadcast and goes on, the others post their
timings and go on, and only the ranks behind them (who are later anyway) wait. On the default
group, a blocking collective at every run's edge made rank 0 wait for the last part to finish
the run's last step, a pipeline drain every `train.log_every` steps.

The schedule of step t, per pair (both sides derive it from t, the data's batch sizes and the
algorithm's expects_delta / sends_delta, so nothing else crosses):

    rank 0   -> rank K-1   label t
    rank k   -> rank k+1   activation t                  (k = 0 .. K-2)
    rank k+1 -> rank k     delta(t): the delta part k+1 uses at step t, if it expects one

delta(t) is the one rank k+1 made at the end of its step t (a `synchronous` algorithm, bp) or
of step t-1 (the others, fr and ddg: the local executor's mailbox holds one delta between steps). For K=2 the first two are the same pair and go
in the order written: label t, activation t, delta(t). Who posts what, and when:

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
the same sequence (label t,) activation t, delta(t), t = t0, t0+1, ..., so the i-th operation
on one side meets the i-th on the other (rule 1: each receive gets its message; rules 2-3: the
heads of the two queues always match). Each operation is posted after computation that waits
only for messages that come earlier in the schedule: activation t needs activation t from the
part before (earlier rank, same t); delta(t) needs the delta the part after made at step t
(bp: a later rank, down to the last part, which needs none) or at step t-1 (fr, ddg: an
earlier step). By induction over (t, rank) every operation is posted, so every one completes.
The old schedule broke rule 2: rank k sent activation t+1 and then took delta(t), while rank k+1
had posted the send of delta(t) before the receive of activation t+1: two sends, each waiting.

Shapes. A receive is posted before its message exists, so its shape is predicted: the batch
size of the step (or test batch) it belongs to, known to every rank from the data, times the
trailing shapes and dtypes of that kind of message, which a small header carries once per kind
(the first message of each kind in this process). A message whose shape differs from the
prediction is an error on the sending side. Where several tensors cross a cut (a skip and a
branch), a step's activation is still ONE message: the tensors packed into one byte buffer, each
at an aligned offset, their shapes and dtypes in the one header; the delta likewise, with a slot
marked empty for a tensor that has no delta (frzoo.activation). A message of one tensor is that
tensor, as it always was. CUDA parts on gloo cross through pinned host
buffers; with NCCL tensors stay on the GPU and waits only order the CUDA streams.

fp16 (frzoo.loss_scale). Every activation and every delta is followed, on the same pair, by one
float64 number: an activation by the overflow report of the parts up to its sender, a delta by
the loss scale that produced it. Both sides post it right after the payload it belongs to, so
the schedule above keeps its order; other precisions send nothing more.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..activation import Deltas, detached, from_saved, to_device, to_saved
from ..algorithms.base import ForwardResult, PartAlgorithm
from ..errors import FrzooError
from ..loss_scale import NO_OVERFLOW
from ..metrics import LOSS_SCALE, PHASES, SKIPPED
from .base import (Batch, EvalTotals, Executor, PhaseClock, eval_forward, load_part_state,
                   part_state, read_windows)
from .replicas import Layout, Replica

# Kinds of message: each has its own trailing shapes and dtypes, sent once in a header.
ACT, DELTA, LABEL, EVAL_ACT, EVAL_LABEL = range(5)
KIND_NAMES = ("activation", "delta", "labels", "evaluation activation", "evaluation labels")
MEMORY_KEYS = ("params_bytes", "optimizer_bytes", "peak_activation_bytes", "peak_allocated_bytes")
SLOT_LEN = 10  # per tensor: dtype (-1: no tensor, a None delta), number of trailing dims, 8 dims
MAX_TENSORS = 8  # tensors one message may carry (the tensors crossing one cut)
HEADER_LEN = 1 + MAX_TENSORS * SLOT_LEN  # the number of tensors, then one slot each
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
ALIGN = 16  # each tensor of a packed message starts at a multiple of this many bytes
#: Per tensor of a message: its dtype and the shape after the batch dimension, or None (no
#: tensor: a delta that is None, see frzoo.activation).
Spec = Tuple[Optional[Tuple[torch.dtype, Tuple[int, ...]]], ...]


def _spec(values: Sequence[Optional[Tensor]]) -> Spec:
    return tuple(None if t is None else (t.dtype, tuple(t.shape[1:])) for t in values)


def _layout(spec: Spec, rows: int) -> Tuple[List[int], int]:
    """Byte offset of each tensor of a packed message of `rows` rows, and its total bytes."""
    offsets, end = [], 0
    for slot in spec:
        offsets.append(end)
        if slot is not None:
            nbytes = rows * math.prod(slot[1]) * torch.empty((), dtype=slot[0]).element_size()
            end += -(-nbytes // ALIGN) * ALIGN
    return offsets, max(end, 1)  # never an empty message


def _packed(spec: Spec) -> bool:
    """A message of one tensor travels as that tensor; several (or a None) in one byte buffer."""
    return len(spec) != 1 or spec[0] is None


class PeerStalled(FrzooError):
    """This process waited longer than distributed.timeout_s for another part."""

    def __init__(self, message: str, peer: Optional[int]) -> None:
        super().__init__(message)
        self.peer = peer  # the rank waited for; None where a collective does not say which


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text
                                              or "Timeout" in text or "timeout" in text)


class _Incoming:
    """A posted receive. `take()` waits for it (the part's `wait` time) and returns its tensors
    (a tuple: frzoo.activation) on the part's device; later calls return the same tuple. In fp16
    the number that follows an activation or a delta is received with it (`side`, read by
    `side_value()`)."""

    def __init__(self, executor: "DistributedExecutor", work: Any, buffer: Tensor, peer: int,
                 what: str, spec: Spec = (), rows: int = 0,
                 side: Optional[Tuple[Any, Tensor]] = None) -> None:
        self.executor, self.work, self.buffer, self.peer, self.what = executor, work, buffer, peer, what
        self.spec, self.rows, self.side = spec, rows, side
        self.tensors: Optional[Tuple[Any, ...]] = None

    def take(self) -> Tuple[Any, ...]:
        if self.tensors is None:
            self.wait()
            self.tensors = self.executor._unpack(self.buffer, self.spec, self.rows)
        return self.tensors

    def side_value(self) -> float:
        assert self.side is not None and self.tensors is not None, "take() it first"
        return float(self.side[1].item())

    def wait(self) -> None:
        with self.executor.clock.timed("wait"), self.executor._waiting(self.peer, self.what):
            self.work.wait()
            if self.side is not None:
                self.side[0].wait()


class DistributedExecutor(Executor):
    """The transport for one part in its own process (the schedule: see the module docstring)."""

    def __init__(self, algorithm: PartAlgorithm, rank: int, world_size: int, backend: str,
                 replica: Optional[Replica] = None, timeout_s: Optional[float] = None) -> None:
        self.algorithms = [algorithm]
        self.algo = algorithm
        # With data-parallel replicas (frzoo.executors.replicas) rank = replica * K + part:
        # rank +- 1 are this replica's neighbours; `world` is K, the depth of one pipeline.
        self.replica = replica
        self.layout = replica.layout if replica is not None else Layout(rank, world_size)
        self.rank = rank
        self.world = self.layout.parts
        self.is_first = self.layout.part == 0
        self.is_last = self.layout.part == self.world - 1
        self.is_leader = rank == self.layout.leader
        self.accepts_stop = rank == 0  # rank 0 feeds the pipeline, so it decides when to stop
        self.device = algorithm.device
        # gloo moves CPU tensors (a CUDA part's through pinned memory); NCCL the part's own GPU's.
        self.wire = torch.device("cpu") if backend == "gloo" else algorithm.device
        self.pinned = self.wire.type == "cpu" and self.device.type == "cuda"
        self.lag = 0 if algorithm.synchronous else 1  # delta(t) is made at step t - lag
        self.clock = PhaseClock(self.wire)  # `wait` on the GPU's stream when tensors stay there
        self.data: Any = None  # the batch sizes predict every message's shape
        self.sent_specs: Dict[int, Spec] = {}
        self.recv_specs: Dict[int, Spec] = {}
        # Deltas made for the previous part that it has not used yet, as (step it uses it at,
        # delta), oldest first: sent or still to send; a checkpoint stores them as its mailbox.
        self.outbox: Deque[Tuple[int, Deltas]] = deque()
        self.scaled = algorithm.scaler is not None  # fp16: a number follows each act./delta
        self.outbox_scales: Dict[int, float] = {}  # fp16: the loss scale of each outbox delta
        self.last_sent = -1  # the step whose delta was sent last
        self.inbox: Dict[Tuple[int, int], _Incoming] = {}  # posted receives by (kind, step)
        self.sends: List[Tuple[int, int, Any, Tensor]] = []  # (tick, peer, work, tensor)
        self.tick = 0  # steps and evaluation batches done: sends older than world+1 are retired
        self.run_end: Optional[int] = None  # the end of the current run of steps; None: idle
        self.posted = 0  # the first step whose receives are not posted yet
        self.finished = -1  # the last step done
        self.next_step = 0
        self.stop_requested = False
        self.timeout_s = timeout_s  # for the message when a peer stops answering
        # The run-start stop flag and the timings cross on a group of their own (gloo, CPU
        # tensors, whatever the parts' backend), apart from the activations and deltas, and
        # asynchronously on the ranks that do not need the answer: so neither drains the
        # pipeline. Created here, on every rank in the same order (a collective call).
        self.control: Any = None
        if self.layout.world > 1:
            timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
            self.control = dist.new_group(backend="gloo", **timeout)
        self.control_works: List[Tuple[Any, Tensor]] = []  # (async work, its tensor) in flight

    def _waiting(self, peer: Optional[int], what: str, by: bool = False) -> "_Waiting":
        return _Waiting(self, peer, what, by)

    # -- the wire
    def _rows(self, step: int) -> int:
        """The rows of training step `step` in this replica: its share of the global batch."""
        rows = self._global_rows(step)
        return rows if self.replica is None else self.replica.rows(rows)

    def _global_rows(self, step: int) -> int:
        """The batch size of training step `step` (every epoch has the same batches)."""
        data = self.data
        if data.drop_last:
            return data.batch_size
        index = step % data.steps_per_epoch()
        return min(data.batch_size, data.info.num_train - index * data.batch_size)

    def _to_wire(self, tensor: Tensor) -> Tensor:
        t = tensor.detach()
        if t.device == self.wire:
            return t.contiguous()
        if self.wire.type != "cpu":  # e.g. labels from the data loader onto the GPU (NCCL)
            return t.to(self.wire).contiguous()
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()  # gloo reads it from the host now
        return buffer

    def _from_wire(self, buffer: Tensor) -> Tensor:
        if buffer.device == self.device or self.wire.type != "cpu":
            return buffer
        return buffer.to(self.device, non_blocking=True)  # from pinned memory: asynchronous

    def _pack(self, values: Sequence[Optional[Tensor]], spec: Spec, rows: int) -> Tensor:
        """Several tensors in one byte buffer on the wire, each at its offset (:func:`_layout`)."""
        offsets, total = _layout(spec, rows)
        buffer = torch.empty(total, dtype=torch.uint8, device=self.wire, pin_memory=self.pinned)
        for t, offset, slot in zip(values, offsets, spec):
            if t is not None and slot is not None:
                _view(buffer, offset, slot, rows).copy_(t.detach(), non_blocking=True)
        if self.pinned:
            for t in values:
                if t is not None and t.device.type == "cuda":
                    torch.cuda.current_stream(t.device).synchronize()  # gloo reads it now
        return buffer

    def _unpack(self, buffer: Tensor, spec: Spec, rows: int) -> Tuple[Any, ...]:
        if not _packed(spec):
            return (self._from_wire(buffer),)
        offsets, _ = _layout(spec, rows)
        return tuple(None if slot is None else self._from_wire(_view(buffer, offset, slot, rows))
                     for offset, slot in zip(offsets, spec))

    def _send(self, kind: int, peer: int, values: Sequence[Optional[Tensor]], rows: int,
              side: Optional[float] = None) -> None:
        """Post the send of a message of `kind` (its tensors: one per tensor crossing the cut,
        or the labels alone) whose receiver expects `rows` rows; the first of its kind goes after
        a header with every tensor's trailing shape and dtype; `side` (fp16), one number, right
        after it."""
        spec = _spec(values)
        expected = self.sent_specs.get(kind, spec)
        if spec != expected or any(t is not None and t.shape[0] != rows for t in values):
            raise FrzooError(
                f"{self.layout.name()} sends a {KIND_NAMES[kind]} of shapes "
                f"{_describe([None if t is None else (t.dtype, tuple(t.shape)) for t in values])} "
                f"but {self.layout.name(peer)} expects "
                f"{_describe([None if e is None else (e[0], (rows, *e[1])) for e in expected])}: "
                f"a receive is posted before its message exists, so a message's shapes must be "
                f"the batch size times the shapes and dtypes of the first message of its kind. "
                f"Make the part's output shapes depend on the batch size only, or use "
                f"executor=local.")
        if kind not in self.sent_specs:
            self._post_send(peer, self._header(kind, spec).to(self.wire))
            self.sent_specs[kind] = spec
        if _packed(spec):
            self._post_send(peer, self._pack(values, spec, rows))
        else:
            self._post_send(peer, self._to_wire(values[0]))  # type: ignore[arg-type]
        if side is not None:
            self._post_send(peer, torch.tensor([side], dtype=torch.float64, device=self.wire))

    def _header(self, kind: int, spec: Spec) -> Tensor:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = len(spec)
        for i, slot in enumerate(spec):
            if i >= MAX_TENSORS or (slot is not None and (slot[0] not in DTYPES
                                                          or len(slot[1]) > SLOT_LEN - 2)):
                raise FrzooError(
                    f"{self.layout.name()} sends a {KIND_NAMES[kind]} of {len(spec)} tensors "
                    f"({_describe(list(spec))}); the distributed executor moves at most "
                    f"{MAX_TENSORS} tensors per message, each of dtype "
                    f"{', '.join(map(str, DTYPES))} with at most {SLOT_LEN - 1} dims. Cut where "
                    f"fewer tensors cross, or use executor=local.")
            base = 1 + i * SLOT_LEN
            if slot is None:
                header[base] = -1
                continue
            header[base], header[base + 1] = DTYPES.index(slot[0]), len(slot[1])
            header[base + 2:base + 2 + len(slot[1])] = torch.tensor(slot[1], dtype=torch.int64)
        return header

    def _post_send(self, peer: int, tensor: Tensor) -> None:
        self.sends.append((self.tick, peer, dist.isend(tensor, peer), tensor))

    def _expect(self, kind: int, peer: int, rows: int, side: bool = False) -> _Incoming:
        """Post the receive of the next message of `kind` from `peer`, of `rows` rows (and, with
        `side`, of the number that follows it). The first of its kind waits for its header
        here (once per process)."""
        what = f"a {KIND_NAMES[kind]}"
        if kind not in self.recv_specs:
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.wire)
            _Incoming(self, dist.irecv(header, peer), header, peer, what).wait()
            values = header.tolist()
            slots = [values[1 + i * SLOT_LEN:1 + (i + 1) * SLOT_LEN] for i in range(values[0])]
            self.recv_specs[kind] = tuple(
                None if v[0] < 0 else (DTYPES[v[0]], tuple(v[2:2 + v[1]])) for v in slots)
        spec = self.recv_specs[kind]
        if _packed(spec):
            buffer = torch.empty(_layout(spec, rows)[1], dtype=torch.uint8, device=self.wire,
                                 pin_memory=self.pinned)
        else:
            dtype, trailing = spec[0]  # type: ignore[misc]
            buffer = torch.empty((rows, *trailing), dtype=dtype, device=self.wire,
                                 pin_memory=self.pinned)
        work = dist.irecv(buffer, peer)
        number = None
        if side:
            value = torch.empty(1, dtype=torch.float64, device=self.wire)
            number = (dist.irecv(value, peer), value)
        return _Incoming(self, work, buffer, peer, what, spec, rows, number)

    def _retire(self, upto: float) -> None:
        """Wait for the sends posted at ticks <= `upto` and drop them. Within a run the
        receivers of sends `world + 1` ticks old have posted their receives (no rank runs that
        far ahead of another), so this wait is over or nearly; it bounds the tensors kept."""
        keep = []
        for entry in self.sends:
            tick, peer, work, _ = entry
            if tick > upto:
                keep.append(entry)
                continue
            with self._waiting(peer, "a message it sent to be taken", by=True):
                work.wait()
        self.sends = keep

    # -- training
    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        self.data = data
        if self.is_first:
            return data.train_batches(epoch, first_batch, self.layout.replica,
                                      self.layout.replicas)
        return iter([None] * (data.steps_per_epoch() - first_batch))

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False,
                   horizon: Optional[int] = None) -> Optional[ForwardResult]:
        start = time.perf_counter()
        self.stop_requested = self.stop_requested or stop
        if self.run_end is None:
            if self._agree_stop():
                self.stopped = True
                return None
            self._start_run(step, step + 1 if horizon is None else max(horizon, step + 1))
        result = self._train_step(batch, step)
        self.clock.add("step", time.perf_counter() - start)
        return result

    def _agree_stop(self) -> bool:
        """Rank 0's answer to "did Ctrl-C ask to stop?", broadcast at the start of every run on
        the control group. Rank 0 decides, so it does not wait for the others to hear it; they
        are behind it in the pipeline, so the answer is there when they ask."""
        flag = torch.tensor([int(self.stop_requested)], dtype=torch.int64)
        if self.layout.world > 1:
            self._retire_control()
            if self.rank == 0:
                self.control_works.append((dist.broadcast(flag, src=0, group=self.control,
                                                          async_op=True), flag))
            else:
                with self._waiting(None, "rank 0 to start a run of steps"):
                    dist.broadcast(flag, src=0, group=self.control)
        return bool(flag.item())

    def _retire_control(self, wait: bool = False) -> None:
        """Forget this rank's control messages that have arrived; with `wait`, wait for all of
        them first. Never waited for during training: the timings this rank handed to the
        leader arrive only once the leader, the last part, finishes the run's last step, and
        waiting for that here is the pipeline drain the control group exists to avoid."""
        if wait:
            with self._waiting(None, "the other parts to take this part's control messages"):
                for work, _ in self.control_works:
                    work.wait()
        self.control_works = [(w, t) for w, t in self.control_works if not w.is_completed()]

    def _start_run(self, step: int, end: int) -> None:
        self.run_end, self.finished, self.posted, self.last_sent = end, step - 1, step, step - 1
        self._post_ahead()

    def _post_ahead(self) -> None:
        """Post, on the pair with the previous rank, all the schedule allows now: the receives
        of the next steps of the run (at most two steps ahead), each followed by the delta the
        previous part uses at that step, once made."""
        while True:
            for slot, delta in self.outbox:
                if self.last_sent < slot < self.posted:
                    rows = self._rows(slot - type(self.algo).staleness_of(self.algo.index - 1,
                                                                          self.world))
                    self._send(DELTA, self.rank - 1, delta, rows,  # every tensor's delta
                               self.outbox_scales.get(slot))
                    self.last_sent = slot
            t = self.posted
            made = t - 1 - self.lag  # the step that makes the delta sent just before step t's receives
            assert self.run_end is not None
            if t >= self.run_end or t > self.finished + 2 \
                    or (made > self.finished and self.algo.sends_delta(made)):
                return
            rows = self._rows(t)
            if self.is_last and not self.is_first:
                self.inbox[(LABEL, t)] = self._expect(LABEL, self.layout.rank_of(0), rows)
            if not self.is_first:
                self.inbox[(ACT, t)] = self._expect(ACT, self.rank - 1, rows, self.scaled)
            self.posted = t + 1

    def _train_step(self, batch: Optional[Batch], step: int) -> Optional[ForwardResult]:
        algo = self.algo
        report: Optional[float] = None  # fp16: the overflow report riding up (frzoo.loss_scale)
        if self.is_first:
            assert batch is not None
            h, target = batch
            if self.world > 1:
                self._send(LABEL, self.layout.rank_of(self.world - 1), (target,), self._rows(step))
            h: Any = (h,)
            report = NO_OVERFLOW
        else:
            incoming = self.inbox.pop((ACT, step))
            h = incoming.take()
            report = incoming.side_value() if self.scaled else None
            target = self.inbox.pop((LABEL, step)).take()[0] if self.is_last else None
        if self.replica is not None:
            self.replica.before_step(self._rows(step), self._global_rows(step))
        if algo.scaler is not None:
            report = algo.scaler.pass_up(report, step)  # type: ignore[arg-type]
        result = algo.forward(to_device(h, algo.device),
                              None if target is None else target.to(algo.device), step)
        if not self.is_last:
            self._send(ACT, self.rank + 1, result.output, self._rows(step),  # type: ignore[arg-type]
                       report if self.scaled else None)
        incoming = None
        if algo.expects_delta(step):  # posted now: it travels while the part replays
            incoming = self._expect(DELTA, self.rank + 1, self._rows(step - algo.staleness),
                                    self.scaled)
        take = None if incoming is None else self._delta_taker(incoming)
        grad_in = algo.backward(take, step)
        if take is not None:
            take()  # taken even by an algorithm that did not ask for it
        if algo.sends_delta(step):
            assert grad_in is not None, f"{self.layout.name()} promised a delta at step {step}"
            self.outbox.append((step + self.lag, detached(grad_in)))
            if algo.scaler is not None:  # the scale of the delta it used goes down with it
                self.outbox_scales[step + self.lag] = algo.scaler.delta_scale  # type: ignore[assignment]
        self.finished, self.next_step = step, step + 1
        self._post_ahead()
        while self.outbox and self.outbox[0][0] <= min(self.last_sent, step):
            slot, _ = self.outbox.popleft()  # sent, and used by the previous part at a step done now
            self.outbox_scales.pop(slot, None)
        self.clock.steps += 1
        self.tick += 1
        self._retire(self.tick - self.world - 1)
        if step + 1 >= self.run_end:  # type: ignore[operator]
            self._end_run()
        if self.replica is not None and self.is_last:  # the global batch's, on the leader
            return self.replica.gather_result(result, self._global_rows(step))
        return result if self.is_leader else None

    def _delta_taker(self, incoming: _Incoming) -> Any:
        """What the algorithm calls for its delta: waits for it and, in fp16, hands the part's
        loss scaler the delta and the scale that came with it (once)."""
        def take() -> Tuple[Any, ...]:
            first = incoming.tensors is None
            delta = incoming.take()
            if first and self.algo.scaler is not None:
                self.algo.scaler.receive(delta, incoming.side_value())
            return delta
        return take

    def _end_run(self) -> None:
        self._retire(math.inf)
        assert not self.inbox, f"receives left posted at the end of a run: {sorted(self.inbox)}"
        self.run_end = None

    # -- evaluation through the same pipeline (eval mode, no history), between runs
    def evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        n, size = data.info.num_test, data.eval_batch_size
        # each replica evaluates every R-th test batch (data.test_batches), from its own index
        sizes = [min(size, n - i) for i in range(0, n, size)][self.layout.replica::self.layout.replicas]
        totals = EvalTotals()
        if self.replica is not None:
            self.replica.share_buffers()
        if self.is_first:
            for x, y in data.test_batches(self.layout.replica, self.layout.replicas):
                if self.world > 1:
                    self._send(EVAL_LABEL, self.layout.rank_of(self.world - 1), (y,), len(y))
                h = eval_forward(self.algo, x)
                if self.is_last:
                    totals.add(h, y)
                else:
                    self._send(EVAL_ACT, self.rank + 1, h, len(y))
                self.tick += 1
                self._retire(self.tick - self.world - 1)
        else:
            posted = 0
            for b in range(len(sizes)):
                while posted < min(b + 2, len(sizes)):  # the next batch's receives, ahead
                    if self.is_last:
                        self.inbox[(EVAL_LABEL, posted)] = self._expect(
                            EVAL_LABEL, self.layout.rank_of(0), sizes[posted])
                    self.inbox[(EVAL_ACT, posted)] = self._expect(EVAL_ACT, self.rank - 1, sizes[posted])
                    posted += 1
                out = eval_forward(self.algo, self.inbox.pop((EVAL_ACT, b)).take())
                if self.is_last:
                    totals.add(out, self.inbox.pop((EVAL_LABEL, b)).take()[0])
                else:
                    self._send(EVAL_ACT, self.rank + 1, out, sizes[b])
                self.tick += 1
                self._retire(self.tick - self.world - 1)
        self._retire(math.inf)
        if self.replica is not None and self.is_last:
            self.replica.reduce_eval(totals)
        return totals.result() if self.is_leader else None

    # -- collective reads for the leader
    def timing_window(self) -> Optional[List[Dict[str, float]]]:
        """Every part's timings on the leader, gathered on the control group: the others hand
        theirs over without waiting (the leader, the last part, is the last to get here), so
        a log point does not drain the pipeline."""
        mine = read_windows([self.clock], [self.algo])[0]
        keys = [*PHASES, "wait", "step", *MEMORY_KEYS, SKIPPED, LOSS_SCALE]
        row = torch.tensor([mine.get(k, math.nan) for k in keys], dtype=torch.float64)
        if self.layout.world == 1:
            rows = [row]
        else:
            self._retire_control()
            if not self.is_leader:
                self.control_works.append((dist.gather(row, None, dst=self.layout.leader,
                                                       group=self.control, async_op=True), row))
                return None
            rows = [torch.empty_like(row) for _ in range(self.layout.world)]
            with self._waiting(None, "the other parts' timings"):
                dist.gather(row, rows, dst=self.layout.leader, group=self.control)
        return [{k: v for k, v in zip(keys, r.tolist()) if not math.isnan(v)}
                for r in rows[:self.world]]  # replica 0's parts

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        """`obj` of every rank (R x K of them, replica-major) on the leader; None elsewhere."""
        out: Optional[List[Any]] = [None] * self.layout.world if self.is_leader else None
        with self._waiting(None, "the other parts to gather"):
            dist.gather_object(obj, out, dst=self.layout.leader)
        return out

    def gather_checkpoint(self) -> Optional[Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
        # The deltas this part made that the previous part has not used are the previous part's
        # mailbox: sent or not, they are the state its next steps depend on.
        if self.replica is not None:
            self.replica.share_buffers()
        unused = [to_saved(d) for slot, d in self.outbox if slot >= self.next_step]
        scales = [self.outbox_scales[slot] for slot, _ in self.outbox if slot >= self.next_step] \
            if self.scaled else []
        gathered = self._gather((_to_cpu(part_state(self.algo)), unused, scales))
        if gathered is None:
            return None
        if self.replica is not None:  # one pipeline's state: the replicas' rows concatenated
            return self.replica.merge_checkpoint([(p, u) for p, u, _ in gathered],
                                                 type(self.algo).batch_state_keys)
        state = {"mailboxes": [gathered[k + 1][1] for k in range(self.world - 1)] + [[]]}
        if self.scaled:  # as the local executor stores them: per mailbox, each delta's scale
            state["delta_scales"] = [gathered[k + 1][2] for k in range(self.world - 1)] + [[]]
        return [p for p, _, _ in gathered], state

    def gather_export(self) -> Optional[List[Dict[str, Tensor]]]:
        mine = self.algo.part.original_state_dict() if self.layout.replica == 0 else None
        gathered = self._gather(_to_cpu(mine))
        return None if gathered is None else gathered[:self.world]  # replica 0's parts

    def load_checkpoint(self, state: Dict[str, Any]) -> None:
        k = self.layout.part
        if self.replica is not None:  # this replica's rows of the global batch's state
            state = self.replica.shard_checkpoint(state, type(self.algo).batch_state_keys)
        load_part_state(self.algo, state["parts"][k])
        self.next_step = int(state["progress"]["step"])
        # The previous part's mailbox, to send again: it uses them at its next steps.
        mailbox = state["executor"]["mailboxes"][k - 1] if k > 0 else []
        self.outbox = deque((self.next_step + i, from_saved(d, self.device))
                            for i, d in enumerate(mailbox))
        if self.scaled:
            scales = state["executor"]["delta_scales"][k - 1] if k > 0 else []
            self.outbox_scales = {self.next_step + i: s for i, s in enumerate(scales)}

    def close(self) -> None:
        self._retire(math.inf)
        if self.layout.world > 1:
            self._retire_control(wait=True)


def _view(buffer: Tensor, offset: int, slot: Tuple[torch.dtype, Tuple[int, ...]],
          rows: int) -> Tensor:
    """The tensor of `slot` inside a packed byte buffer, at `offset` (a view: no copy)."""
    dtype, trailing = slot
    shape = (rows, *trailing)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def _describe(slots: Sequence[Any]) -> str:
    return ", ".join("none" if s is None else f"{tuple(s[1])} ({s[0]})" for s in slots)


class _Waiting:
    """Turns a transport timeout into PeerStalled naming the part this process waited for."""

    def __init__(self, executor: DistributedExecutor, peer: Optional[int], what: str,
                 by: bool = False) -> None:
        self.executor, self.peer, self.what = executor, peer, what
        self.preposition = "by" if by else "from"  # a send waits for its receiver

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None or not _is_timeout(exc):
            return False
        layout = self.executor.layout
        limit = f"{self.executor.timeout_s:g} s" if self.executor.timeout_s else "the timeout"
        whom = layout.name(self.peer) if self.peer is not None else "the other parts"
        raise PeerStalled(f"{layout.name()} waited more than {limit} "
                          f"(distributed.timeout_s) for {self.what} {self.preposition} {whom}",
                          self.peer) from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
