"""All parts in one process, each on its own device: the reference every other executor matches.

The executor is the transport: it moves activations up and deltas down between parts and keeps a
FIFO mailbox of deltas per part. It knows nothing of what the algorithm does with them.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..algorithms.base import ForwardResult, PartAlgorithm


class LocalExecutor:
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
        self.mailboxes: List[Deque[Tensor]] = [deque() for _ in self.algorithms]
        # Seconds per part in the last iteration: forward (play) and backward (replay+update).
        self.timings: List[Dict[str, float]] = [{} for _ in self.algorithms]

    @property
    def num_parts(self) -> int:
        return len(self.algorithms)

    def train_step(self, x: Tensor, y: Tensor, step: int) -> ForwardResult:
        h = x
        result = ForwardResult()
        for algo, timing in zip(self.algorithms, self.timings):
            start = time.perf_counter()
            target = y.to(algo.device) if algo.is_last else None
            result = algo.forward(h.to(algo.device), target, step)
            timing["forward"] = time.perf_counter() - start
            h = result.output  # type: ignore[assignment]
        for k in reversed(range(self.num_parts)):
            algo = self.algorithms[k]
            start = time.perf_counter()
            delta = self.mailboxes[k].popleft() if algo.expects_delta(step) else None
            grad_in = algo.backward(delta, step)
            if algo.sends_delta(step):
                assert grad_in is not None, f"part {k + 1} promised a delta at step {step}"
                self.mailboxes[k - 1].append(grad_in.to(self.algorithms[k - 1].device))
            self.timings[k]["backward"] = time.perf_counter() - start
        return result

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The chained forward in eval mode (no history, no RNG seeding, no state change)."""
        modes = [a.part.training for a in self.algorithms]
        for algo in self.algorithms:
            algo.part.eval()
        try:
            h = x
            for algo in self.algorithms:
                h = algo.part(h.to(algo.device))
            return h
        finally:
            for algo, mode in zip(self.algorithms, modes):
                algo.part.train(mode)

    # -- checkpointing of what is in flight between parts
    def state_dict(self) -> Dict[str, Any]:
        return {"mailboxes": [[d.detach().cpu() for d in box] for box in self.mailboxes]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.mailboxes = [deque(d.to(a.device) for d in box)
                          for box, a in zip(state["mailboxes"], self.algorithms)]
