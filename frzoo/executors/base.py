"""What the trainer asks of an executor, whichever process layout runs the parts."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import (Any, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activation import as_activation, to_device
from ..algorithms.base import ForwardResult, PartAlgorithm, PhaseTimer
from ..metrics import PEAK_ALLOCATED, PHASES

Batch = Tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TimedPart:
    """A part this process runs, as the `train.trace` timeline (frzoo.timeline) records it: its
    replica, its algorithm, and every timer that times its phases (the algorithm's, and the
    executor's own: `wait`, `send`)."""
    replica: int
    algo: PartAlgorithm
    timers: Tuple[PhaseTimer, ...]


class Executor:
    """Runs the parts of one training job. The trainer loop is the same for every executor:

    - ``batches`` yields one item per step (the batch where this process feeds the first part,
      ``None`` elsewhere);
    - ``train_step`` runs one iteration of this process's parts and returns the last part's
      ForwardResult on the leader (the process that logs and writes files), ``None`` elsewhere;
      ``horizon`` is the step at which the current run of consecutive steps ends (the next log
      point, epoch end or the end): steps up to it follow with nothing else in between, so an
      executor may prepare them ahead;
    - ``evaluate``, ``timing_window``, ``gather_export`` and ``gather_trace`` are collective:
      every process calls them at the same step, and the leader gets the result;
    - ``timed_parts`` says which timers time each of this process's parts (frzoo.timeline);
    - ``checkpoint_entries`` is this process's share of a checkpoint (its parts' entries,
      frzoo.executors.part_state), which every process writes itself, at the same step, with
      DCP on ``checkpoint_group`` (None: one process); ``load_checkpoint`` reads its parts'
      entries from a checkpoint of either format (frzoo.checkpoint.open_checkpoint).
    """

    algorithms: List[PartAlgorithm]
    is_leader: bool = True
    stopped: bool = False  # set by train_step when a stop was requested (Ctrl-C) before this step
    accepts_stop: bool = True  # whether Ctrl-C in this process requests the stop
    checkpoint_group: Any = None  # the gloo group DCP coordinates a save on (None: one process)
    publishes_checkpoints: bool = True  # the process that renames a finished save into place

    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        raise NotImplementedError

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False,
                   horizon: Optional[int] = None) -> Optional[ForwardResult]:
        raise NotImplementedError

    def evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        raise NotImplementedError

    def timing_window(self) -> Optional[List[Dict[str, float]]]:
        raise NotImplementedError

    def checkpoint_entries(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def saving(self) -> ContextManager[None]:
        """Around a checkpoint save: how a failed collective of it is reported (one process:
        nothing to report)."""
        return contextlib.nullcontext()

    def gather_export(self) -> Optional[List[Dict[str, Tensor]]]:
        raise NotImplementedError

    def timed_parts(self) -> List[TimedPart]:
        raise NotImplementedError

    def gather_trace(self, mine: Any) -> Optional[List[Any]]:
        """`mine` (this process's spans) of every process on the leader; None elsewhere."""
        raise NotImplementedError

    def load_checkpoint(self, checkpoint: Any, carry: bool = True) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def micro_batches(batch: Batch, count: int) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """A batch's inputs and targets as `count` equal micro-batches, in row order (what a plain
    gradient-accumulation loop over the unsplit model would take)."""
    x, y = batch
    if len(y) % count:
        raise ValueError(f"a batch of {len(y)} rows does not split into {count} equal "
                         f"micro-batches")
    return x.chunk(count), y.chunk(count)


def part_state(algo: PartAlgorithm) -> Dict[str, Any]:
    """What a checkpoint stores of one part (CPU tensors; fp16: its loss scaler too)."""
    state = {"model": algo.part.state_dict(), "optimizer": algo.optimizer.state_dict(),
             "algorithm": algo.state_dict()}
    if algo.scaler is not None:
        state["loss_scale"] = algo.scaler.state_dict()
    return state


def load_part_state(algo: PartAlgorithm, state: Dict[str, Any]) -> None:
    algo.part.load_state_dict(state["model"])
    algo.optimizer.load_state_dict(state["optimizer"])
    algo.load_state_dict(state["algorithm"])
    if algo.scaler is not None:
        algo.scaler.load_state_dict(state["loss_scale"])


class PhaseClock:
    """Per-part seconds per phase, summed over a window of steps, read as means per step: the
    algorithm's phases and the executor's own (`wait`, timed on `device`; `step`)."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.steps = 0
        self.timer = PhaseTimer(device)

    def add(self, phase: str, seconds: float) -> None:
        self.timer.add(phase, seconds)

    def timed(self, phase: str, **args: Any) -> Any:
        return self.timer(phase, **args)

    def span(self, name: str, **args: Any) -> Any:
        """A span of the timeline only, while tracing (PhaseTimer.span)."""
        return self.timer.span(name, **args)

    def read(self, algo: PartAlgorithm) -> Dict[str, float]:
        """Mean seconds per step of every phase since the last read, then reset; with memory
        measurement on (or on CUDA), the part's bytes too (keys ending in `_bytes`)."""
        steps = max(self.steps, 1)
        phases = algo.timer.read()
        out = {phase: phases.get(phase, 0.0) / steps for phase in PHASES}
        out.update({phase: value / steps for phase, value in self.timer.read().items()})
        if algo.memory is not None or algo.device.type == "cuda":
            out.update({k: float(v) for k, v in algo.memory_report().items()})
        if algo.scaler is not None:  # fp16: skipped steps (a count), the last part's scale
            out.update(algo.scaler.read())
        self.steps = 0
        return out


def cuda_peaks(devices: Iterable[torch.device]) -> Dict[torch.device, int]:
    """Each CUDA device's peak allocated bytes since the previous call; then its counter is reset.

    The one place that reads or resets the counters, and every device is read before any is
    reset: read and reset per part, a second part on the same device would get what the first
    part's reset left (the memory in use), not the peak.
    """
    cuda = list(dict.fromkeys(d for d in devices if d.type == "cuda"))
    peaks = {d: torch.cuda.max_memory_allocated(d) for d in cuda}
    for device in cuda:
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


def read_windows(clocks: Sequence[PhaseClock],
                 algos: Sequence[PartAlgorithm]) -> List[Dict[str, float]]:
    """PhaseClock.read of each part, with its CUDA device's peak allocated bytes in the window."""
    peaks = cuda_peaks(algo.device for algo in algos)
    rows = [clock.read(algo) for clock, algo in zip(clocks, algos)]
    for row, algo in zip(rows, algos):
        if algo.device in peaks:
            row[PEAK_ALLOCATED] = float(peaks[algo.device])
    return rows


class EvalTotals:
    """Test loss, top-1 and top-5 accumulated over batches of logits."""

    def __init__(self) -> None:
        self.count = self.loss = self.top1 = self.top5 = 0.0
        self.num_classes = 0

    def add(self, logits: Tensor, target: Tensor) -> None:
        logits, target = logits.float().cpu(), target.cpu()
        self.num_classes = logits.shape[1]
        self.loss += float(F.cross_entropy(logits, target, reduction="sum"))
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.top1 += float((best[:, 0] == target).sum())
        self.top5 += float((best == target[:, None]).any(dim=1).sum())
        self.count += len(target)

    def result(self) -> Dict[str, float]:
        n = max(self.count, 1)
        out = {"test_loss": self.loss / n, "test_acc1": 100 * self.top1 / n}
        if self.num_classes > 5:
            out["test_acc5"] = 100 * self.top5 / n
        return out


@torch.no_grad()
def eval_forward(algo: PartAlgorithm, h: Any) -> Any:
    """One part's forward in eval mode: no history, no RNG seeding, no state change. `h` is the
    data or an activation (frzoo.activation); the result an activation, or the last part's
    logits."""
    mode = algo.part.training
    algo.part.eval()
    try:
        out = algo.part(*to_device(as_activation(h), algo.device))
        return out if algo.is_last else as_activation(out)
    finally:
        algo.part.train(mode)
