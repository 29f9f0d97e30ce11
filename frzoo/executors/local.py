"""All parts in one process, each on its own device: the reference every other executor matches.

The executor is the transport: it moves activations up and deltas down between parts and keeps a
FIFO mailbox of deltas per part. It knows nothing of what the algorithm does with them. Both are
tuples, one entry per tensor crossing the cut (frzoo.activation). In fp16 each delta's loss scale
waits beside it, and each activation carries the overflow report of the part that made it
(frzoo.loss_scale), as in the distributed executor.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import activation
from ..activation import Deltas
from ..algorithms.actions import BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, simulate
from ..algorithms.base import ForwardResult, PartAlgorithm
from ..loss_scale import NO_OVERFLOW
from .base import (Batch, EvalTotals, Executor, PhaseClock, TimedPart, eval_forward,
                   load_part_state, micro_batches, part_state, read_windows)
from .part_state import layout_state, load_layout, load_weights, part_entries


class LocalExecutor(Executor):
    """Runs one training iteration of all parts: forwards 1..K, then backwards K..1.

    Running the backwards from the last part down means part k finds in its mailbox, in FIFO
    order, the deltas part k+1 sent in earlier iterations before the one it sent just now; so an
    algorithm with a one-iteration delta delay (Features Replay) and one without (backprop) both
    get the right delta from the same rule. The parts' backwards have no data dependence under
    Features Replay, so their order does not change the result: the distributed executor runs
    them at the same time.
    """

    def __init__(self, algorithms: Sequence[PartAlgorithm]) -> None:
        self.algorithms = list(algorithms)
        self.mailboxes: List[Deque[Deltas]] = [deque() for _ in self.algorithms]
        # fp16: the loss scale of each delta in the mailboxes, in the same order
        self.delta_scales: List[Deque[float]] = [deque() for _ in self.algorithms]
        self.scaled = any(a.scaler is not None for a in self.algorithms)
        self.clocks = [PhaseClock() for _ in self.algorithms]
        self.orders: Dict[int, Any] = {}  # synchronous schedules: the simulated order, by M

    @property
    def num_parts(self) -> int:
        return len(self.algorithms)

    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        return data.train_batches(epoch, first_batch)

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False,
                   horizon: Optional[int] = None) -> Optional[ForwardResult]:
        if stop:
            self.stopped = True
            return None
        start = time.perf_counter()
        result = self._train_step(batch, step)
        for clock in self.clocks:  # the parts share one process: each step is every part's wall
            clock.add("step", time.perf_counter() - start)
        return result

    def _train_step(self, batch: Optional[Batch], step: int) -> ForwardResult:
        assert batch is not None
        if self.algorithms[0].runs_actions:
            return self._action_step(batch, step)
        x, y = batch
        h = activation.as_activation(x)
        result = ForwardResult()
        report = NO_OVERFLOW  # fp16: the overflow report riding up with the activation
        for algo in self.algorithms:
            if algo.scaler is not None:
                report = algo.scaler.pass_up(report, step)
            target = y.to(algo.device) if algo.is_last else None
            result = algo.forward(activation.to_device(h, algo.device), target, step)
            h = result.output  # type: ignore[assignment]
        for k in reversed(range(self.num_parts)):
            algo = self.algorithms[k]
            delta = self.mailboxes[k].popleft() if algo.expects_delta(step) else None
            if algo.scaler is not None and delta is not None:
                algo.scaler.receive(delta, self.delta_scales[k].popleft())
            grad_in = algo.backward(delta, step)
            if algo.sends_delta(step):
                assert grad_in is not None, f"part {k + 1} promised a delta at step {step}"
                self.mailboxes[k - 1].append(
                    activation.to_device(grad_in, self.algorithms[k - 1].device))
                if algo.scaler is not None:  # the scale of the delta it used goes down with it
                    self.delta_scales[k - 1].append(algo.scaler.delta_scale)  # type: ignore[arg-type]
        for clock in self.clocks:
            clock.steps += 1
        return result

    def _action_step(self, batch: Batch, step: int) -> ForwardResult:
        """One step of a synchronous schedule: every part's actions (frzoo.algorithms.actions)
        in the one order :func:`simulate` gives, messages kept by (sender, micro-batch)."""
        algos, num = self.algorithms, self.num_parts
        m_count = algos[0].microbatches  # type: ignore[attr-defined]
        xs, ys = micro_batches(batch, m_count)
        if m_count not in self.orders:
            self.orders[m_count] = simulate(type(algos[0]).schedule(num, m_count))  # type: ignore[attr-defined]
        acts: Dict[Tuple[int, int], Any] = {}
        deltas: Dict[Tuple[int, int], Tuple[Any, Optional[float]]] = {}
        reports = [NO_OVERFLOW] * (num + 1)  # fp16: the report riding up, by part (+1: below 0)
        result = ForwardResult()
        for k, action in self.orders[m_count]:
            algo, m = algos[k], action.micro
            if action.kind == FORWARD:
                h = (xs[m],) if k == 0 else acts.pop((k - 1, m))
                if algo.scaler is not None and m == 0:
                    reports[k + 1] = algo.scaler.pass_up(reports[k], step)
                target = ys[m].to(algo.device) if algo.is_last else None
                out = algo.micro_forward(activation.to_device(h, algo.device), target, step, m)  # type: ignore[attr-defined]
                if out is not None:
                    acts[(k, m)] = activation.to_device(out, algos[k + 1].device)
            elif action.kind in (BACKWARD, INPUT_GRAD):
                delta, scale = deltas.pop((k + 1, m)) if not algo.is_last else (None, None)
                if algo.scaler is not None and delta is not None:
                    algo.scaler.receive(delta, scale, more=m > 0)
                run = algo.micro_backward if action.kind == BACKWARD else algo.input_backward  # type: ignore[attr-defined]
                grad_in = run(delta, step, m)
                if k > 0:
                    scale = algo.scaler.delta_scale if algo.scaler is not None else None
                    deltas[(k, m)] = (activation.to_device(grad_in, algos[k - 1].device), scale)
            elif action.kind == WEIGHT_GRAD:
                algo.weight_backward(step, m)  # type: ignore[attr-defined]
            elif algo.is_last:
                result = algo.update(step)  # type: ignore[attr-defined]
            else:
                algo.update(step)  # type: ignore[attr-defined]
        for clock in self.clocks:
            clock.steps += 1
        return result

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The chained forward in eval mode."""
        h: Any = x
        for algo in self.algorithms:
            h = eval_forward(algo, h)
        return h

    def evaluate(self, data: Any) -> Dict[str, float]:
        totals = EvalTotals()
        for x, y in data.test_batches():
            totals.add(self.predict(x), y)
        return totals.result()

    def timing_window(self) -> List[Dict[str, float]]:
        return read_windows(self.clocks, self.algorithms)

    def timed_parts(self) -> List[TimedPart]:
        return [TimedPart(0, algo, (algo.timer, clock.timer))
                for algo, clock in zip(self.algorithms, self.clocks)]

    def gather_trace(self, mine: Any) -> List[Any]:
        return [mine]  # every part is here

    # -- checkpointing: the parts, and what is in flight between them
    def checkpoint_entries(self) -> Dict[str, Tensor]:
        """Every part's entries (frzoo.executors.part_state); the deltas part k sent that part
        k-1 has not used are part k-1's mailbox."""
        out: Dict[str, Tensor] = {}
        for k, algo in enumerate(self.algorithms):
            sent = [activation.to_saved(d) for d in self.mailboxes[k - 1]] if k > 0 else []
            scales = list(self.delta_scales[k - 1]) if k > 0 and self.scaled else []
            out.update(part_entries(algo, 0, sent, scales))
        return out

    def load_checkpoint(self, checkpoint: Any, carry: bool = True) -> None:
        """Every part's weights and optimizer state by name; with the layout the checkpoint was
        written with (`carry`), the algorithms' state and the mailboxes too, else the warm-up
        starts afresh at the checkpoint's step (frzoo.checkpoint.layout_note)."""
        if isinstance(checkpoint, dict) or getattr(checkpoint, "legacy", None) is not None:
            self.load_old_checkpoint(checkpoint if isinstance(checkpoint, dict)
                                     else checkpoint.legacy)
            return
        for algo in self.algorithms:
            load_weights(algo, checkpoint)
            if not carry:
                algo.origin = int(checkpoint.meta["progress"]["step"])
        if not carry:
            return
        for k, algo in enumerate(self.algorithms):
            state = layout_state(checkpoint, algo, 0, 1)
            load_layout(algo, state)
            if k > 0:
                device = self.algorithms[k - 1].device
                self.mailboxes[k - 1] = deque(activation.from_saved(d, device)
                                              for d in state["sent"])
                if self.scaled:
                    self.delta_scales[k - 1] = deque(state["sent_scales"])

    def gather_checkpoint(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """The state in format 1's form (one dict per part, the mailboxes): for tests and
        tools that snapshot the parts in memory."""
        state: Dict[str, Any] = {"mailboxes": [[activation.to_saved(d) for d in box]
                                               for box in self.mailboxes]}
        if self.scaled:
            state["delta_scales"] = [list(box) for box in self.delta_scales]
        return [part_state(a) for a in self.algorithms], state

    def gather_export(self) -> List[Dict[str, Tensor]]:
        return [a.part.original_state_dict() for a in self.algorithms]

    def load_old_checkpoint(self, state: Dict[str, Any]) -> None:
        """A format-1 checkpoint's state (or :meth:`gather_checkpoint`'s, with its parts)."""
        for algo, part in zip(self.algorithms, state["parts"]):
            load_part_state(algo, part)
        self.load_state_dict(state["executor"])

    # kept for tests that snapshot the transport alone
    def state_dict(self) -> Dict[str, Any]:
        return self.gather_checkpoint()[1]

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.mailboxes = [deque(activation.from_saved(d, a.device) for d in box)
                          for box, a in zip(state["mailboxes"], self.algorithms)]
        if self.scaled:
            self.delta_scales = [deque(box) for box in state["delta_scales"]]
