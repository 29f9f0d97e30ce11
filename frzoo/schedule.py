"""When things happen in a run: log points, evaluations, checkpoints, epoch ends, horizons.

A run's position is its global step (the number of steps taken). Every "when" of the training
loop is a question about that number, answered here and nowhere else, so that a resumed run
(which restarts from a step read from its checkpoint) takes the same branches as a run that
never stopped. The object is pure and frozen: the loop asks, it does not tell.

Terms: `step` is the count of steps taken so far (after step t has run, the count is t + 1);
a *point* is such a count at which something happens once the step that reached it is done.

The learning-rate horizon (`lr_steps`) is the number of steps the schedule's curve spans
(cosine decays over it). It is fixed at a run's first start and kept in its checkpoint: a resume
that raises `train.max_steps` or `train.epochs` continues the same curve (past its end, at the
curve's last value) instead of restarting it from a higher rate (docs/recipes.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from omegaconf import DictConfig

from .optim import lr_multiplier


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int  # where this start stops: min(train.epochs * steps_per_epoch, max_steps)
    log_every: int  # steps between log points
    eval_every: int  # epochs between evaluations (0: only at the end)
    checkpoint_every: int  # steps between checkpoints (0: at epoch ends only)
    lr_steps: int  # the learning-rate schedule's horizon (fixed at the first start)

    @classmethod
    def of(cls, train: DictConfig, steps_per_epoch: int,
           lr_steps: Optional[int] = None) -> "Schedule":
        """The schedule of a run's `train:` section; `lr_steps` is the horizon a checkpoint
        recorded (None on a first start: this start's own horizon)."""
        total = train.epochs * steps_per_epoch
        if train.max_steps:
            total = min(total, train.max_steps)
        return cls(steps_per_epoch, total, train.log_every, train.eval_every,
                   train.checkpoint_every, lr_steps or total)

    # ------------------------------------------------------------ positions
    def position(self, step: int) -> Tuple[int, int]:
        """(epoch, batch within the epoch) of the next step to take."""
        return divmod(step, self.steps_per_epoch)

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def done(self, step: int) -> bool:
        return step >= self.total_steps

    def horizon(self, step: int) -> int:
        """The count that ends the current stretch: the next log point, epoch end or the run's
        end. The steps up to it follow with nothing else in between (the distributed executor
        posts their receives ahead)."""
        return min(self.total_steps, (step // self.steps_per_epoch + 1) * self.steps_per_epoch,
                   (step // self.log_every + 1) * self.log_every)

    # ------------------------------------------------------------ points
    def is_log_point(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def is_epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def is_eval_point(self, step: int) -> bool:
        """An epoch end that `train.eval_every` evaluates (the end of training always does:
        :meth:`needs_final_eval`)."""
        return (self.is_epoch_end(step) and self.eval_every > 0
                and (step // self.steps_per_epoch) % self.eval_every == 0)

    def is_checkpoint_point(self, step: int) -> bool:
        """Where `train.checkpoint_every` writes a checkpoint inside an epoch (epoch ends, a stop
        and the end always write one: :meth:`ends_stretch_with_checkpoint`)."""
        return self.checkpoint_every > 0 and step % self.checkpoint_every == 0

    def ends_stretch_with_checkpoint(self, step: int, stopped: bool) -> bool:
        """After an epoch's batches: a checkpoint at an epoch end, a stop, or the run's end."""
        return self.is_epoch_end(step) or stopped or self.done(step)

    def pending_eval(self, step: int, last_eval_step: Optional[int]) -> bool:
        """On resume: the checkpoint was written at an epoch end before its evaluation (the
        process was stopped between the two); the evaluation is owed."""
        return (0 < step < self.total_steps and self.is_eval_point(step)
                and last_eval_step != step)

    def needs_final_eval(self, step: int, last_eval_step: Optional[int]) -> bool:
        """At the end of a run that was not interrupted: evaluate unless this step was."""
        return last_eval_step != step

    # ------------------------------------------------------------ learning rate
    def lr_factor(self, step: int, schedule: DictConfig) -> float:
        """The factor on the base lr at step `step` (0-based), over the kept horizon."""
        return lr_multiplier(step, self.steps_per_epoch, self.lr_steps, schedule)

    def horizon_note(self, schedule: DictConfig, lr: float) -> Optional[str]:
        """One line when this start runs past the lr schedule's kept horizon (a resume with a
        larger train.max_steps / train.epochs), saying which rate the extra steps get."""
        if self.total_steps <= self.lr_steps or not _depends_on_horizon(schedule):
            return None
        last = lr * self.lr_factor(self.lr_steps, schedule)
        return (f"the {schedule.name} lr schedule keeps the horizon of this run's first start "
                f"({self.lr_steps} steps); steps {self.lr_steps}..{self.total_steps - 1} run at "
                f"its final lr {last:.3g}. For a new schedule, start a new run from these "
                f"weights: model.init_checkpoint=RUN_DIR/final.pt.")


def _depends_on_horizon(schedule: Any) -> bool:
    """Only cosine decays over the run's length; constant and multistep are fixed per epoch."""
    return schedule.name == "cosine"
