"""The run's schedule (frzoo.schedule): every "when" of the training loop, alone and at every
point a run can resume from. Pure: no model, no process."""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from omegaconf import OmegaConf

from frzoo.config import load_recipe
from frzoo.schedule import Schedule


def schedule(*, spe: int = 6, epochs: int = 3, max_steps: Optional[int] = None, log_every: int = 4,
             eval_every: int = 1, checkpoint_every: int = 0,
             lr_steps: Optional[int] = None) -> Schedule:
    train = OmegaConf.create({"epochs": epochs, "max_steps": max_steps, "log_every": log_every,
                              "eval_every": eval_every, "checkpoint_every": checkpoint_every})
    return Schedule.of(train, spe, lr_steps)


def test_points_of_a_run():
    s = schedule(max_steps=16, checkpoint_every=5)
    assert s.total_steps == 16 and s.lr_steps == 16
    assert [t for t in range(1, 17) if s.is_log_point(t)] == [4, 8, 12, 16]  # and the last step
    assert [t for t in range(1, 17) if s.is_epoch_end(t)] == [6, 12]
    assert [t for t in range(1, 17) if s.is_eval_point(t)] == [6, 12]
    assert [t for t in range(1, 17) if s.is_checkpoint_point(t)] == [5, 10, 15]
    assert s.position(13) == (2, 1) and s.epoch(9) == 1.5
    assert not s.done(15) and s.done(16)
    # a stretch ends at the next log point, epoch end or the run's end
    assert [s.horizon(t) for t in (0, 3, 4, 5, 8, 13, 15)] == [4, 4, 6, 6, 12, 16, 16]


def test_eval_every_and_only_at_the_end():
    assert [t for t in range(1, 19) if schedule(eval_every=2).is_eval_point(t)] == [12]
    assert not any(schedule(eval_every=0).is_eval_point(t) for t in range(1, 19))
    assert schedule().total_steps == 18 and schedule(max_steps=100).total_steps == 18


def events(s: Schedule, step: int = 0, *, last_eval: Optional[int] = None, resumed: bool = False,
           kill_after: Optional[int] = None) -> List[Tuple[str, int]]:
    """What frzoo.trainer._run_loop does, as (event, step), asking the schedule as it does; a
    kill after the `kill_after`-th event ends the list there (the process is gone)."""
    out: List[Tuple[str, int]] = []

    def emit(kind: str) -> bool:
        out.append((kind, step))
        return kill_after is not None and len(out) >= kill_after

    if resumed and s.pending_eval(step, last_eval):
        if emit("eval") or emit("ckpt"):
            return out
    while not s.done(step):
        for _ in range(s.position(step)[1], s.steps_per_epoch):
            step += 1
            if s.is_log_point(step) and emit("log"):
                return out
            if s.is_checkpoint_point(step) and emit("ckpt"):
                return out
            if s.done(step):
                break
        if s.is_eval_point(step) and emit("eval"):
            return out
        if s.ends_stretch_with_checkpoint(step, False) and emit("ckpt"):
            return out
    if s.needs_final_eval(step, out_last_eval(out, last_eval)):
        emit("eval") or emit("ckpt")
    return out


def out_last_eval(out: List[Tuple[str, int]], before: Optional[int]) -> Optional[int]:
    evals = [t for kind, t in out if kind == "eval"]
    return evals[-1] if evals else before


@pytest.mark.parametrize("kwargs", [
    {},  # checkpoints at epoch ends only
    {"checkpoint_every": 6},  # the epoch-end checkpoint written before its evaluation
    {"checkpoint_every": 4, "log_every": 3},  # checkpoints at log points and mid-epoch
    {"max_steps": 14, "checkpoint_every": 5},  # max_steps mid-epoch
    {"eval_every": 2, "checkpoint_every": 3},
    {"eval_every": 0, "max_steps": 12},  # max_steps at an epoch end; evaluated only at the end
])
def test_a_kill_after_any_checkpoint_resumes_into_the_same_run(kwargs):
    """Kill the run right after each checkpoint it writes (log point, checkpoint point, epoch end,
    the epoch-end checkpoint before its evaluation, the end) and resume from it: the evaluations,
    logs and checkpoints still to come are those of the run that never stopped."""
    s = schedule(**kwargs)
    straight = events(s)
    kinds = {kind for kind, _ in straight}
    assert kinds == {"log", "eval", "ckpt"}
    for index, (kind, step) in enumerate(straight):
        if kind != "ckpt":
            continue
        before = straight[:index + 1]
        assert events(s, kill_after=index + 1) == before
        resumed = events(s, step, last_eval=out_last_eval(before, None), resumed=True)
        # (the same checkpoint written twice, at a checkpoint point that is an epoch end, is
        # one checkpoint)
        assert dedupe(before + resumed) == dedupe(straight), (kwargs, step)


def dedupe(seq: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    return [e for i, e in enumerate(seq) if i == 0 or e != seq[i - 1]]


def test_the_owed_evaluation_of_an_epoch_end_checkpoint():
    """checkpoint_every at an epoch end writes the checkpoint before the epoch's evaluation; a
    run killed between the two owes that evaluation on resume, and only that one."""
    s = schedule(checkpoint_every=6)
    assert s.pending_eval(6, last_eval_step=None)
    assert not s.pending_eval(6, last_eval_step=6)  # evaluated before the kill
    assert not s.pending_eval(5, last_eval_step=None)  # not an epoch end
    assert not s.pending_eval(18, last_eval_step=12)  # the end: the final evaluation does it
    assert not schedule(eval_every=2).pending_eval(6, last_eval_step=None)  # not evaluated epoch
    assert s.needs_final_eval(18, last_eval_step=12) and not s.needs_final_eval(18, 18)


def test_the_lr_horizon_is_kept_on_resume():
    """A resume that raises max_steps keeps the cosine curve of the first start: the rate at
    every step is the first start's, and past its end the curve's last value (no restart)."""
    recipe = load_recipe(None, ["model.name=x", "optimizer.schedule.name=cosine"])
    cosine = recipe.optimizer.schedule
    first = schedule(max_steps=10)
    extended = schedule(max_steps=14, lr_steps=first.lr_steps)
    assert extended.total_steps == 14 and extended.lr_steps == 10
    for step in range(10):
        assert extended.lr_factor(step, cosine) == first.lr_factor(step, cosine)
    assert [extended.lr_factor(step, cosine) for step in range(10, 14)] == [0.0] * 4
    note = extended.horizon_note(cosine, lr=0.1)
    assert note is not None and "(10 steps)" in note and "steps 10..13" in note \
        and "model.init_checkpoint=" in note
    assert first.horizon_note(cosine, lr=0.1) is None  # no extension, nothing to say
    assert schedule(max_steps=8, lr_steps=10).horizon_note(cosine, lr=0.1) is None  # shorter
    constant = load_recipe(None, ["model.name=x"]).optimizer.schedule
    assert extended.horizon_note(constant, lr=0.1) is None  # the horizon changes nothing there
