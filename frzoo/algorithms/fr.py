"""Features Replay (Huo, Gu, Huang, NeurIPS 2018), Algorithm 1, for one part.

Part k of K (paper numbering) at iteration t:
  play    forward the fresh input h^t_{k-1} WITHOUT a graph, keep only that input (history);
  replay  forward the input of iteration t-(K-k) again, with the CURRENT weights w^t_k;
  backward the delta part k+1 sent at iteration t-1 through the replay; the gradient w.r.t. the
          replayed input (taken at w^t, before the update) goes to part k-1 for iteration t+1;
  update  w^{t+1}_k = w^t_k - lr * g^t_k.
The last part (k = K, staleness 0) is ordinary backprop of the loss on the current sample.
See docs/algorithm.md ("The index check", "Details the paper leaves out").
"""
from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Literal, Optional, Tuple

import torch
from torch import Tensor

from .. import activation
from ..activation import Activation, Deltas, as_activation
from ..plugins import register_algorithm
from .base import (DelayedPart, Delta, ForwardResult, Input, PartAlgorithm, arrived,
                   frozen_bn_stats)
from .input_check import check_unchanged, versions


@register_algorithm("fr")
class FeaturesReplay(DelayedPart):
    """One part under Features Replay.

    Options (the recipe's algorithm.warmup / algorithm.replay_bn):
      warmup: 'skip'  (authors' code) the part makes no update while no stale sample exists,
                      i.e. for its first K-k iterations;
              'zeros' (paper) those iterations replay a zero input with a zero delta: the loss
                      gradient is exactly zero, so the step applies only weight decay/momentum.
                      The zero replay itself is not run (its gradient is known to be zero and it
                      would feed zeros into BatchNorm's running statistics).
      replay_bn: 'once'  running BatchNorm statistics are updated by the play only;
                 'twice' by the play and the replay (authors' code).
    """

    @dataclass(frozen=True)
    class Options(PartAlgorithm.Options):
        warmup: Literal["skip", "zeros"] = "skip"
        replay_bn: Literal["once", "twice"] = "once"

    batch_state_keys = ("history",)  # per-sample: each replica holds its rows (PartAlgorithm)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup = self.options.warmup
        self.replay_bn = self.options.replay_bn
        # (iteration, input), oldest first; the input is a tuple of tensors (frzoo.activation)
        self.history: Deque[Tuple[int, Activation]] = deque()
        # the inputs' version counters at the play, by sample: checked before the replay
        self.versions: Dict[int, Tuple[int, ...]] = {}

    @classmethod
    def part_cost(cls, index: int, num_parts: int, forward: float, backward: float) -> float:
        """Play, replay and backward (2F + B); the last part F + B."""
        if index < num_parts - 1:
            return 2 * forward + backward
        return forward + backward

    @classmethod
    def memory_cost(cls, index: int, num_parts: int, *, weights: float, saved: float,
                    input_bytes: float) -> float:
        """One graph (the replay's) and K - k more inputs (the history; an input's bytes are the
        sum over the tensors crossing the cut)."""
        return weights + saved + cls.staleness_of(index, num_parts) * input_bytes

    def forward(self, h_in: Input, target: Optional[Tensor], step: int) -> ForwardResult:
        if self.is_last:
            assert target is not None
            return self._last_part_forward(h_in, target, step)
        # The only thing the play keeps. Detached: the history's tensors are this part's own
        # objects (same storage), even where the previous part passes its own input through.
        h_in = activation.detached(as_activation(h_in))
        self.history.append((step, h_in))
        self.versions[step] = versions(h_in)  # before the forward, which must not write into it
        with torch.no_grad(), self.timed("forward"):
            return ForwardResult(output=self._run(h_in, step))

    def backward(self, delta: Delta, step: int) -> Optional[Deltas]:
        """The Features Replay step of this part at iteration `step`."""
        if self.is_last:  # staleness 0: plain backprop of the loss computed in forward()
            return self._last_part_backward()

        stale_step = step - self.delay  # the sample whose delta arrived: t - (K - k)
        if stale_step < self.origin:  # warm-up: no stale sample exists yet
            self._warmup_update(self.warmup)
            return None

        sample_step, h_stale = self.history.popleft()
        assert sample_step == stale_step, (sample_step, stale_step)  # history is in step order
        recorded = self.versions.pop(sample_step, versions(h_stale))
        check_unchanged(self.part, self.index, h_stale, recorded, sample_step,
                        lambda: self._run(h_stale, sample_step))  # the search runs on errors only
        activation.make_leaves(h_stale, not self.is_first)  # its play ran without a graph
        bn_policy = frozen_bn_stats(self.part) if self.replay_bn == "once" else nullcontext()
        with bn_policy, self.timed("replay"):
            replayed = self._run(h_stale, sample_step)  # current weights, the play's RNG masks
        delta = arrived(delta)  # may have been in flight during the replay: wait only now
        with self.timed("backward"):
            # delta = dLoss/dh^{stale}_k, sent by part k+1 at t-1: one per output tensor
            activation.backward(replayed, delta)  # type: ignore[arg-type]
        # taken at w^t, before the update
        grad_in = None if self.is_first else activation.input_deltas(h_stale)
        self._apply_update()
        return grad_in

    def held_tensors(self) -> List[Tensor]:
        return [t for _, h in self.history for t in h]

    def state_dict(self) -> Dict[str, Any]:
        # a one-tensor input is saved as its tensor, as before multi-tensor cuts (frzoo.activation)
        return {"history_steps": [s for s, _ in self.history],
                "history": [activation.to_saved(h) for _, h in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = deque((int(s), activation.from_saved(h, self.device))
                             for s, h in zip(state["history_steps"], state["history"]))
        self.versions = {s: versions(h) for s, h in self.history}
