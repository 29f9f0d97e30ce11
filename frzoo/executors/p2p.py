"""The transport between parts in separate processes (torch.distributed point-to-point).

Rank k runs part k+1 with exactly the per-part step the local executor calls; only the transport
differs. Per iteration t, rank k:

    receive h_{k-1}^t from rank k-1 (rank 0 takes the batch and sends the labels to the last rank)
    forward (the play)                         -> send h_k^t to rank k+1 (asynchronously)
    receive the delta rank k+1 sent (FIFO)     -> backward and update -> send its delta to rank k-1

Sends are asynchronous, so rank k goes on with iteration t+1 as soon as its own iteration t is
done: after warm-up every rank is busy with its own forward, replay and backward, and the period
approaches the slowest part's work (docs/algorithm.md, "Ideal speed"). Every message carries a
small header (kind, shape), so a smaller last batch and the stop signal need no other
coordination. The last rank (which has the loss) is the leader: it logs and writes files.

Processes are started and supervised by frzoo.executors.launch; this module only moves tensors.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..algorithms.base import ForwardResult, PartAlgorithm
from ..metrics import PHASES
from ..errors import FrzooError
from .base import (Batch, EvalTotals, Executor, PhaseClock, eval_forward, load_part_state,
                   part_state, read_windows)

# Message kinds in a header, and the tags of the channels (gloo matches on tags; NCCL on the
# order of calls between two ranks, which the schedule keeps the same on both sides).
DATA, STOP, END = 0, 1, 2
ACT, DELTA, LABEL, EVAL_ACT, EVAL_LABEL, TIMING = 1, 2, 3, 4, 5, 6
MEMORY_KEYS = ("params_bytes", "optimizer_bytes", "peak_activation_bytes", "peak_allocated_bytes")
HEADER_LEN = 10  # kind, dtype, ndim, up to 7 dims
TRAINING, EVALUATION = 0, 1  # send channels (see DistributedExecutor._advance)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


class PeerStalled(FrzooError):
    """This process waited longer than distributed.timeout_s for another part."""

    def __init__(self, message: str, peer: Optional[int]) -> None:
        super().__init__(message)
        self.peer = peer  # the rank waited for; None where a collective does not say which


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text
                                              or "Timeout" in text or "timeout" in text)


class DistributedExecutor(Executor):
    """The transport for one part in its own process."""

    def __init__(self, algorithm: PartAlgorithm, rank: int, world_size: int, backend: str) -> None:
        self.algorithms = [algorithm]
        self.algo = algorithm
        self.rank = rank
        self.world = world_size
        self.is_first = rank == 0
        self.is_leader = rank == world_size - 1
        self.accepts_stop = self.is_first  # rank 0 feeds the pipeline, so it decides when to stop
        # gloo moves CPU tensors; NCCL moves tensors on the part's own GPU.
        self.wire = torch.device("cpu") if backend == "gloo" else algorithm.device
        self.mailbox: Deque[Tensor] = deque()  # deltas received before they are due (checkpoint)
        # isend works and the tensors they read, with the channel (TRAINING or EVALUATION) and
        # the tick of that channel (a training step, an evaluation batch) they were sent at.
        self.pending: List[Tuple[int, int, Any, Tensor]] = []
        self.ticks = [0, 0]
        self.channel = TRAINING
        self.clock = PhaseClock()
        self.next_step = 0
        self.timeout_s: Optional[float] = None  # for the message when a peer stops answering

    def _waiting(self, peer: Optional[int], what: str) -> "_Waiting":
        return _Waiting(self, peer, what)

    # -- transport
    def _send(self, dst: int, tag: int, tensor: Optional[Tensor], kind: int = DATA) -> None:
        """Header then payload, both asynchronous; the tensors live until the sends complete."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = kind
        if tensor is not None:
            header[1] = DTYPES.index(tensor.dtype)
            header[2] = tensor.dim()
            header[3:3 + tensor.dim()] = torch.tensor(tensor.shape)
        header = header.to(self.wire)
        tick = self.ticks[self.channel]
        self.pending.append((self.channel, tick, dist.isend(header, dst, tag=tag), header))
        if tensor is not None:
            payload = tensor.detach().to(self.wire).contiguous()
            self.pending.append((self.channel, tick, dist.isend(payload, dst, tag=tag), payload))

    def _advance(self, channel: int) -> None:
        """Next tick of `channel`: wait for its sends of `world + 1` ticks ago and drop them.

        gloo's `is_completed()` stays False until `wait()`, so without this the list would keep
        every tensor sent since the last checkpoint (memory growing all epoch). Within a channel
        a message's receiver needs nothing newer than the next tick from this rank to take it,
        and no rank runs more than `world` ticks ahead of another, so this wait is over (or
        nearly) and cannot deadlock; it only bounds memory. The channels are kept apart because
        a training step's last delta is taken only after the evaluation that may follow it.
        """
        self.ticks[channel] += 1
        due = self.ticks[channel] - self.world - 1
        old = [entry for entry in self.pending if entry[0] == channel and entry[1] <= due]
        if not old:
            return
        with self._waiting(None, "its sends to complete"):
            for entry in old:
                entry[2].wait()
        self.pending = [entry for entry in self.pending
                        if not (entry[0] == channel and entry[1] <= due)]

    def _recv(self, src: int, tag: int) -> Tuple[int, Optional[Tensor]]:
        start = time.perf_counter()
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.wire)
        with self._waiting(src, "a message"):
            dist.recv(header, src, tag=tag)
        header = header.cpu()
        kind = int(header[0])
        payload = None
        if kind == DATA:
            shape = [int(d) for d in header[3:3 + int(header[2])]]
            payload = torch.empty(shape, dtype=DTYPES[int(header[1])], device=self.wire)
            with self._waiting(src, "a message"):
                dist.recv(payload, src, tag=tag)
        self.clock.add("wait", time.perf_counter() - start)
        return kind, payload

    def flush(self) -> None:
        with self._waiting(None, "its sends to complete"):
            for _, _, work, _ in self.pending:
                work.wait()
        self.pending = []

    # -- training
    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        if self.is_first:
            return data.train_batches(epoch, first_batch)
        return iter([None] * (data.steps_per_epoch() - first_batch))

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False) -> Optional[ForwardResult]:
        self._advance(TRAINING)
        start = time.perf_counter()
        result = self._train_step(batch, step, stop)
        self.clock.add("step", time.perf_counter() - start)
        return result

    def _train_step(self, batch: Optional[Batch], step: int, stop: bool) -> Optional[ForwardResult]:
        algo, last = self.algo, self.world - 1
        if self.is_first:
            if stop:
                self._stop_downstream()
                return None
            assert batch is not None
            h, target = batch
            if self.world > 1:
                self._send(last, LABEL, target)
        else:
            kind, h = self._recv(self.rank - 1, ACT)
            if kind == STOP:
                self._stop_downstream()
                return None
            target = None
        if self.is_leader and not self.is_first:
            target = self._recv(0, LABEL)[1]
        result = algo.forward(h.to(algo.device), None if target is None else target.to(algo.device), step)
        if not self.is_leader:
            self._send(self.rank + 1, ACT, result.output)
        if algo.expects_delta(step):
            delta = self.mailbox.popleft() if self.mailbox else self._recv(self.rank + 1, DELTA)[1]
            assert delta is not None
            delta = delta.to(algo.device)
        else:
            delta = None
        grad_in = algo.backward(delta, step)
        if algo.sends_delta(step):
            assert grad_in is not None
            self._send(self.rank - 1, DELTA, grad_in)
        self.clock.steps += 1
        self.next_step = step + 1
        return result if self.is_leader else None

    def _stop_downstream(self) -> None:
        if not self.is_leader:
            self._send(self.rank + 1, ACT, None, kind=STOP)
        self.stopped = True

    # -- evaluation through the same pipeline (eval mode, no history)
    def evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        self.channel = EVALUATION
        try:
            return self._evaluate(data)
        finally:
            self.channel = TRAINING

    def _evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        totals = EvalTotals()
        if self.is_first:
            for x, y in data.test_batches():
                self._advance(EVALUATION)  # bounds the evaluation's sends in flight too
                h = eval_forward(self.algo, x)
                if self.is_leader:
                    totals.add(h, y)
                    continue
                self._send(self.rank + 1, EVAL_ACT, h)
                self._send(self.world - 1, EVAL_LABEL, y)
            if not self.is_leader:
                self._send(self.rank + 1, EVAL_ACT, None, kind=END)
        else:
            while True:
                kind, h = self._recv(self.rank - 1, EVAL_ACT)
                if kind == END:
                    if not self.is_leader:
                        self._send(self.rank + 1, EVAL_ACT, None, kind=END)
                    break
                assert h is not None
                self._advance(EVALUATION)
                out = eval_forward(self.algo, h)
                if self.is_leader:
                    totals.add(out, self._recv(0, EVAL_LABEL)[1])  # type: ignore[arg-type]
                else:
                    self._send(self.rank + 1, EVAL_ACT, out)
        return totals.result() if self.is_leader else None

    # -- collective reads for the leader
    def timing_window(self) -> Optional[List[Dict[str, float]]]:
        mine = read_windows([self.clock], [self.algo])[0]
        keys = [*PHASES, "wait", "step", *MEMORY_KEYS]
        if not self.is_leader:
            self._send(self.world - 1, TIMING, torch.tensor([mine.get(k, -1.0) for k in keys],
                                                            dtype=torch.float64))
            return None
        rows = []
        for rank in range(self.world - 1):
            values = self._recv(rank, TIMING)[1]
            assert values is not None
            rows.append({k: v for k, v in zip(keys, values.tolist()) if v != -1.0})
        return rows + [mine]

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        self.flush()
        out: Optional[List[Any]] = [None] * self.world if self.is_leader else None
        with self._waiting(None, "the other parts to gather a checkpoint"):
            dist.gather_object(obj, out, dst=self.world - 1)
        return out

    def gather_checkpoint(self) -> Optional[Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
        # A delta sent for the next step is part of the state: take it off the wire now. (Its
        # sender finished the previous step, so it has been sent, also when a stop came.)
        if not self.algo.synchronous and self.algo.expects_delta(self.next_step) \
                and not self.mailbox:
            delta = self._recv(self.rank + 1, DELTA)[1]
            assert delta is not None
            self.mailbox.append(delta)
        mine = (_to_cpu(part_state(self.algo)), [d.cpu() for d in self.mailbox])
        gathered = self._gather(mine)
        if gathered is None:
            return None
        return [p for p, _ in gathered], {"mailboxes": [m for _, m in gathered]}

    def gather_export(self) -> Optional[List[Dict[str, Tensor]]]:
        return self._gather(_to_cpu(self.algo.part.original_state_dict()))

    def load_checkpoint(self, state: Dict[str, Any]) -> None:
        load_part_state(self.algo, state["parts"][self.rank])
        self.mailbox = deque(d.to(self.wire) for d in state["executor"]["mailboxes"][self.rank])
        self.next_step = int(state["progress"]["step"])

    def close(self) -> None:
        self.flush()


class _Waiting:
    """Turns a transport timeout into PeerStalled naming the part this process waited for."""

    def __init__(self, executor: DistributedExecutor, peer: Optional[int], what: str) -> None:
        self.executor, self.peer, self.what = executor, peer, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None or not _is_timeout(exc):
            return False
        me = self.executor.rank
        limit = f"{self.executor.timeout_s:g} s" if self.executor.timeout_s else "the timeout"
        whom = (f"part {self.peer + 1} (rank {self.peer})" if self.peer is not None
                else "the other parts")
        raise PeerStalled(f"part {me + 1} (rank {me}) waited more than {limit} "
                          f"(distributed.timeout_s) for {self.what} from {whom}", self.peer) from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
