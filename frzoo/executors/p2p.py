"""The distributed executor: one part in its own process, its neighbours over torch.distributed.

Rank k runs part k+1 with exactly the per-part step the local executor calls; only the transport
differs. The last rank (which has the loss) is the leader: it logs and writes files. Processes are
started and supervised by frzoo.executors.launch. What this process sends and receives, and when,
is the per-pair schedule (frzoo.executors.schedule); how a message is encoded and posted, the
codec and the wire (frzoo.executors.codec, frzoo.executors.wire); the stop flag and the timings
cross on the control group (frzoo.executors.control); which rank runs what, the topology
(frzoo.executors.topology). With data-parallel replicas (`distributed.replicas`) rank r*K + k runs
part k+1 of replica r; what crosses replicas (gradient sums, BatchNorm statistics, metrics,
checkpoint shards) is left to frzoo.executors.replicas.
"""
from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional

import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from ..activation import from_saved, to_device, to_saved
from ..algorithms.base import ForwardResult, PartAlgorithm
from ..checkpoint_files import cause_of
from ..metrics import LOSS_SCALE, PHASES, SKIPPED
from .action_runner import ActionRunner
from .base import Batch, Executor, TimedPart, load_part_state, read_windows
from .control import ControlGroup
from .part_state import layout_state, load_layout, load_weights, part_entries
from .replicas import Replica
from .schedule import PairSchedule
from .topology import Layout
from .wire import Wire

MEMORY_KEYS = ("params_bytes", "optimizer_bytes", "peak_activation_bytes", "peak_allocated_bytes")
TIMING_KEYS = (*PHASES, "wait", "step", *MEMORY_KEYS, SKIPPED, LOSS_SCALE)


class DistributedExecutor(Executor):
    """The transport for one part in its own process (the schedule: frzoo.executors.schedule)."""

    def __init__(self, algorithm: PartAlgorithm, rank: int, world_size: int, backend: str,
                 replica: Optional[Replica] = None, timeout_s: Optional[float] = None,
                 checkpoint_async: bool = False) -> None:
        self.algorithms = [algorithm]
        self.algo = algorithm
        # With data-parallel replicas (frzoo.executors.replicas) rank = replica * K + part:
        # rank +- 1 are this replica's neighbours; `world` is K, the depth of one pipeline.
        self.replica = replica
        self.layout = replica.layout if replica is not None else Layout(rank, world_size)
        self.rank = rank
        self.world = self.layout.parts
        self.is_leader = rank == self.layout.leader
        self.accepts_stop = rank == 0  # rank 0 feeds the pipeline, so it decides when to stop
        self.device = algorithm.device
        self.wire = Wire(self.layout, algorithm.device, backend, timeout_s)
        self.clock = self.wire.clock
        self.pairs = PairSchedule(algorithm, self.layout, self.wire)
        # fr, bp, ddg: one fixed step (the schedule above); gpipe, 1f1b, zb1: a list of actions
        self.steps: Any = ActionRunner(algorithm, self.layout, self.wire, self.pairs) \
            if algorithm.runs_actions else self.pairs
        self.next_step = 0
        self.stop_requested = False
        # Created here, on every rank in the same order (a collective call).
        self.control = ControlGroup(self.layout, timeout_s, self.wire.waiting)
        # Checkpoint saves (DCP) coordinate on the control group: CPU objects on gloo, whatever
        # the parts' backend, in the same order on every rank as its other messages. An
        # asynchronous save runs them in a background thread, which must not interleave with the
        # control group's messages: it gets a gloo group of its own (frzoo.checkpoint_files).
        # Rank 0 renames a finished save into place. None (one rank): DCP without a group.
        self.checkpoint_group = self.control.group
        if checkpoint_async and self.layout.world > 1:
            self.checkpoint_group = dist.new_group(backend="gloo", **(
                {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}))
        self.publishes_checkpoints = rank == 0

    # -- training
    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        self.pairs.data = data
        if self.layout.is_first:
            return data.train_batches(epoch, first_batch, self.layout.replica,
                                      self.layout.replicas)
        return iter([None] * (data.steps_per_epoch() - first_batch))

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False,
                   horizon: Optional[int] = None) -> Optional[ForwardResult]:
        start = time.perf_counter()
        self.stop_requested = self.stop_requested or stop
        if self.steps.run_end is None:
            if self.control.agree_stop(self.stop_requested):
                self.stopped = True
                return None
            self.steps.start_run(step, step + 1 if horizon is None else max(horizon, step + 1))
        result = self._train_step(batch, step)
        self.clock.add("step", time.perf_counter() - start)
        return result

    def _train_step(self, batch: Optional[Batch], step: int) -> Optional[ForwardResult]:
        algo, pairs = self.algo, self.pairs
        if self.replica is not None:
            self.replica.before_step(pairs.rows(step), pairs.data.batch_rows(step))
        if self.steps is not pairs:
            result = self.steps.step(batch, step)
            self.next_step = step + 1
            self.clock.steps += 1
            return self._result(result, step)
        h, target, report = pairs.take_input(batch, step)
        if algo.scaler is not None:  # fp16: the overflow report riding up (frzoo.loss_scale)
            report = algo.scaler.pass_up(report, step)  # type: ignore[arg-type]
        result = algo.forward(to_device(h, algo.device),
                              None if target is None else target.to(algo.device), step)
        pairs.send_output(step, result.output, report)
        take = pairs.delta_taker(step)  # posted now: it travels while the part replays
        grad_in = algo.backward(take, step)
        if take is not None:
            take()  # taken even by an algorithm that did not ask for it
        self.next_step = step + 1
        pairs.finish_step(step, grad_in)
        self.clock.steps += 1
        return self._result(result, step)

    def _result(self, result: ForwardResult, step: int) -> Optional[ForwardResult]:
        if self.replica is not None and self.layout.is_last:  # the global batch's, on the leader
            return self.replica.gather_result(
                result, self.pairs.data.shard_sizes(step, self.layout.replicas))
        return result if self.is_leader else None

    # -- evaluation through the same pipeline (eval mode, no history), between runs
    def evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        if self.replica is not None:
            self.replica.share_buffers()
        totals = self.pairs.evaluate(data)
        if self.replica is not None and self.layout.is_last:
            self.replica.reduce_eval(totals)
        return totals.result() if self.is_leader else None

    # -- collective reads for the leader
    def timing_window(self) -> Optional[List[Dict[str, float]]]:
        """Every part's timings on the leader, gathered on the control group without draining
        the pipeline (frzoo.executors.control)."""
        mine = read_windows([self.clock], [self.algo])[0]
        rows = self.control.gather_timings(mine, TIMING_KEYS)
        return None if rows is None else rows[:self.world]  # replica 0's parts

    def timed_parts(self) -> List[TimedPart]:
        return [TimedPart(self.layout.replica, self.algo, (self.algo.timer, self.clock.timer))]

    def gather_trace(self, mine: Any) -> Optional[List[Any]]:
        """Every rank's spans on the leader, on the control group (gloo, CPU objects, whatever
        the parts' backend); once per run, after the trace window, at a log point where no
        message of the pipeline is in flight."""
        return self.control.gather_objects(mine)

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        """`obj` of every rank (R x K of them, replica-major) on the leader; None elsewhere."""
        out: Optional[List[Any]] = [None] * self.layout.world if self.is_leader else None
        with self.wire.waiting(None, "the other parts to gather"):
            dist.gather_object(obj, out, dst=self.layout.leader)
        return out

    def checkpoint_entries(self) -> Dict[str, Tensor]:
        """This part's entries (frzoo.executors.part_state), written by this process. The
        deltas this part made that the previous part has not used are the previous part's
        mailbox: sent or not, they are the state its next steps depend on."""
        if self.replica is not None:  # every copy writes replica 0's buffers (stored once)
            self.replica.share_buffers()
        unused, scales = self.pairs.unused_deltas(self.next_step)
        return part_entries(self.algo, self.layout.replica, [to_saved(d) for d in unused],
                            scales)

    def gather_export(self) -> Optional[List[Dict[str, Tensor]]]:
        mine = self.algo.part.original_state_dict() if self.layout.replica == 0 else None
        gathered = self._gather(to_cpu(mine))
        return None if gathered is None else gathered[:self.world]  # replica 0's parts

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Around a checkpoint save (or the wait for one): a peer lost or stalled in DCP's
        collectives is a PeerFailure naming this rank, as any other wait (frzoo.executors.wire),
        so that the launcher blames the process that failed first."""
        with self.wire.waiting(None, "the other parts to save a checkpoint"):
            try:
                yield
            except CheckpointException as exc:  # DCP collects the ranks' failures
                cause = cause_of(exc, RuntimeError)
                if cause is None:
                    raise
                raise cause from exc

    def load_checkpoint(self, checkpoint: Any, carry: bool = True) -> None:
        """This part's weights and optimizer state by name; with the layout the checkpoint was
        written with (`carry`), its history (this replica's rows, whatever R wrote it) and the
        deltas to send again, else the warm-up starts afresh at the checkpoint's step."""
        if getattr(checkpoint, "legacy", None) is not None:
            self.load_old_checkpoint(checkpoint.legacy)
            return
        load_weights(self.algo, checkpoint)
        self.next_step = int(checkpoint.meta["progress"]["step"])
        if not carry:
            self.algo.origin = self.next_step
            return
        state = layout_state(checkpoint, self.algo, self.layout.replica, self.layout.replicas)
        load_layout(self.algo, state)
        self.pairs.load_mailbox(self.next_step, [from_saved(d, self.device) for d in state["sent"]],
                                state["sent_scales"] if self.pairs.scaled else [])

    def load_old_checkpoint(self, state: Dict[str, Any]) -> None:
        """A format-1 checkpoint's state (one file, the whole pipeline)."""
        k = self.layout.part
        if self.replica is not None:  # this replica's rows of the global batch's state
            state = self.replica.shard_checkpoint(state, type(self.algo).batch_state_keys)
        load_part_state(self.algo, state["parts"][k])
        self.next_step = int(state["progress"]["step"])
        # The previous part's mailbox, to send again: it uses them at its next steps.
        mailbox = state["executor"]["mailboxes"][k - 1] if k > 0 else []
        scales = state["executor"]["delta_scales"][k - 1] if self.pairs.scaled and k > 0 else []
        self.pairs.load_mailbox(self.next_step, [from_saved(d, self.device) for d in mailbox],
                                scales)

    def close(self) -> None:
        self.wire.retire(float("inf"))
        self.control.close()


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (in dicts, lists, tuples) detached and on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
