"""fp16 loss scaling that stays correct when parts use deltas of different ages (Features Replay).

fp16 gradients underflow unless the loss is multiplied by a large scale before the backward and
the parameter gradients are divided by it before the step (torch's GradScaler). Under Features
Replay the delta part k uses at step t was made by part k+1 at step t-1 from a loss of step
t-(K-k): the scale may have changed since. So the scale is not a global: the last part (the
only one with a loss) owns it, and every delta travels with the scale that produced it.

The rule, the same in every executor (docs/algorithm.md, "fp16 loss scaling"):

- **Scaling.** At step t the last part backpropagates loss x S_t. Part k unscales its own
  parameter gradients with the scale that came with the delta it used, and sends its input
  gradient (still scaled) down with that same scale.
- **Overflow.** A part whose received delta or unscaled gradients hold inf/NaN makes no
  optimizer step (no momentum, no weight decay: GradScaler's skip) and still sends its delta
  down, where the non-finite values make the part below skip in turn. So an overflow skips
  exactly the updates that depend on it, part after part, one step later per link.
- **Reporting.** Each part remembers the smallest scale at which its last backward overflowed
  (inf when none). The value rides UP with the part's next activation, min-ed with what came
  from below, so at step t+1 the last part learns the overflows of every part's backward of
  step t, before its own backward.
- **Scale update** (the last part, from step 1 on, before it uses the scale): with m the
  reported minimum, S_{t+1} = S_t * backoff if m <= S_t (an overflow at the current scale or a
  smaller one); unchanged if m > S_t (the overflow was caused by a scale already backed off
  from: a delta still in flight when the scale was lowered, which would otherwise halve the
  scale once per part for one event); after `growth_interval` steps in a row with no overflow
  anywhere, S * growth. Any overflow restarts the count. For plain backprop (every part at
  step t uses S_t) this is exactly GradScaler's update.

Loss scaling changes nothing but the size of the numbers in between: with no overflow, each
part's unscaled gradient is its fp16 gradient of the plain loss, up to fp16 rounding.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .metrics import LOSS_SCALE, SKIPPED

NO_OVERFLOW = math.inf  # the reported value of a step where no part overflowed
GROWTH, BACKOFF = 2.0, 0.5  # GradScaler's factors


class LossScaler:
    """One part's share of fp16 loss scaling (the rule: see the module docstring).

    Every part has one: the last part's holds the scale and its growth count; every part's
    holds the scale of the delta its current backward uses (`delta_scale`, which goes down with
    the delta it makes) and the overflow it reports up with its next activation. The executor
    moves those two values beside the tensors; the algorithm calls :meth:`scale_loss` and
    :meth:`unscale` (frzoo.algorithms.base).
    """

    def __init__(self, *, is_last: bool, init_scale: float, growth_interval: int) -> None:
        self.is_last = is_last
        self.scale = float(init_scale)  # the last part's: the scale of its next loss
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # steps in a row with no overflow anywhere
        self.overflow = NO_OVERFLOW  # smallest scale the last backward overflowed at
        self.skipped = 0  # optimizer steps skipped since the start of the run
        self.window_skipped = 0  # ... since the last read()
        self.delta_scale: Optional[float] = None  # the scale of the delta this step uses
        self._delta_bad: Optional[Tensor] = None  # whether that delta holds inf/NaN (on device)

    # -- forward: overflow reports ride up with the activations
    def pass_up(self, below: float, step: int) -> float:
        """Called before this part's forward of `step` with the report that came with its input
        (NO_OVERFLOW for the first part): the report to send with its output. The last part
        updates its scale with it instead (from step 1 on: step 0 has nothing to report)."""
        report = min(below, self.overflow)
        self.overflow = NO_OVERFLOW
        self.delta_scale, self._delta_bad = None, None  # nothing received yet this step
        if self.is_last and step > 0:
            self._update(report)
        return report

    def _update(self, report: float) -> None:
        if report == NO_OVERFLOW:
            self.growth_tracker += 1
            if self.growth_tracker >= self.growth_interval:
                self.scale *= GROWTH
                self.growth_tracker = 0
            return
        self.growth_tracker = 0
        if report <= self.scale:  # not an echo of a scale already backed off from
            self.scale *= BACKOFF

    # -- backward
    def receive(self, delta: Optional[Sequence[Optional[Tensor]]], scale: Optional[float],
                more: bool = False) -> None:
        """The delta this part's backward uses now (one per tensor crossing the cut, None where a
        tensor has none: frzoo.activation), and the scale that came with it. `more`: another
        micro-batch's delta of the same step (frzoo.algorithms.pipelines), whose inf/NaN adds to
        the step's; the scale is the step's, the same for all."""
        self.delta_scale = scale
        if not more:
            self._delta_bad = None
        for d in delta or ():
            if d is not None:
                bad = ~torch.isfinite(d).all()
                self._delta_bad = bad if self._delta_bad is None else self._delta_bad | bad

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The last part's loss times the current scale (the scale its delta will carry)."""
        self.delta_scale = self.scale
        return loss * self.scale

    def unscale(self, parameters: Iterable[nn.Parameter]) -> bool:
        """Divide the gradients by the scale of the delta that produced them, in place, as
        GradScaler does; False when they or that delta hold inf/NaN (the step is skipped). With
        no scale (an update without a delta: the `zeros` warm-up) the gradients are kept."""
        if self.delta_scale is None:
            return True
        bad = self.overflowed(self.unscale_grads([p.grad for p in parameters if p.grad is not None]))
        return self.settle(bad is None or not bool(bad))  # one read of the device per step

    def unscale_grads(self, grads: Sequence[Tensor]) -> Optional[Tensor]:
        """:meth:`unscale`'s division, for some of the gradients (data-parallel replicas unscale
        each bucket as it completes: frzoo.executors.replicas): whether they hold inf/NaN, on
        their device; None when there is nothing to unscale (no gradient, or no scale)."""
        if self.delta_scale is None or not grads:
            return None
        found = torch.zeros(1, device=grads[0].device)
        inv = torch.full((), self.delta_scale, dtype=torch.float64,
                         device=grads[0].device).reciprocal().float()
        torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found, inv)
        return found.bool().squeeze()

    def overflowed(self, found: Optional[Tensor]) -> Optional[Tensor]:
        """`found` (inf/NaN in the unscaled gradients), or the delta this step used holding
        inf/NaN: whether this part overflowed, on its device (None: neither was looked at)."""
        bad = self._delta_bad
        if found is None:
            return bad
        return found if bad is None else bad | found

    def settle(self, finite: bool) -> bool:
        """The step's outcome: an overflow is remembered (reported up with the next
        activation, as the smallest scale overflowed at) and counted as a skipped step."""
        if finite or self.delta_scale is None:
            return True
        self.overflow = min(self.overflow, self.delta_scale)
        self.skipped += 1
        self.window_skipped += 1
        return False

    # -- metrics and checkpoints
    def read(self) -> Dict[str, float]:
        """Skipped steps since the last read; the last part adds its current scale."""
        out = {SKIPPED: float(self.window_skipped)}
        if self.is_last:
            out[LOSS_SCALE] = self.scale
        self.window_skipped = 0
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "overflow": self.overflow, "skipped": self.skipped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.overflow = float(state["overflow"])
        self.skipped = int(state["skipped"])
