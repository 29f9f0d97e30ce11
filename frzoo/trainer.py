"""The training loop: steps, evaluation, checkpoints, metrics. Reads top to bottom.

The global step is the only position: epoch and batch follow from it (every epoch has the same
number of steps), the learning rate is a function of it, and dropout/augmentation are seeded from
it. That is what makes a resumed run equal, bit for bit, to one that never stopped. *When* each
thing happens (log points, evaluations, checkpoints, epoch ends) is a question to the run's
:class:`~frzoo.schedule.Schedule`; the loop below only states the order of things.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from omegaconf import DictConfig
from tqdm import tqdm

from . import metrics, rundir
from .pipeline import Pipeline
from .checkpoint import (OldCheckpoint, atomic_save, carries_layout, check_compatible,
                         export_state_dict, layout_note, meta_entry, open_checkpoint)
from .checkpoint_files import CheckpointWriter, partial_saves
from .config import save_recipe, to_container
from .data import DataModule
from .errors import FrzooError, NonFiniteLossError
from .messages import log
from .executors.base import Executor
from .logging import JsonlLogger, Logger, MultiLogger, NullLogger
from .optim import set_lr
from .schedule import Schedule
from .sigma import SigmaProbe
from .stop import StopRequest
from .timeline import Timeline, Window as TraceWindow


def run_loop(cfg: DictConfig, out_dir: Path, resume: bool, *, pipeline: Pipeline, data: DataModule,
             executor: Executor, loggers: Sequence[Logger] = (),
             probe: Optional[SigmaProbe] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """The loop every process runs. Only the leader (the process holding the last part) logs and
    writes files; evaluation, checkpoints and timings are collective calls of the executor."""
    run = None
    try:
        run = Run(cfg, out_dir, pipeline, data, executor, probe)
        run.start(resume, loggers)
        return _run_loop(run, should_stop or (lambda: False))
    except OSError as exc:  # a full disk at any write (metrics, summary ...): say so, one line
        if exc.errno not in rundir.DISK_ERRORS:
            raise
        where = f" writing '{exc.filename}'" if exc.filename else ""
        raise FrzooError(f"run.out_dir '{out_dir}' cannot be written{where} ({exc.strerror}); "
                         f"training stopped. Free space. {rundir.last_good_checkpoint(out_dir)}."
                         ) from None
    finally:
        if run is not None and getattr(run, "writer", None) is not None:
            run.writer.abandon()  # after a failure: the save in flight, if any, is not waited for


def _run_loop(run: "Run", should_stop: Callable[[], bool]) -> Dict[str, Any]:
    """The order of things; the schedule says when, the components how."""
    schedule, executor, step = run.schedule, run.executor, run.progress["step"]
    if run.resumed and schedule.pending_eval(step, run.progress.get("last_eval_step")):
        # The checkpoint was written at the epoch's end, before its evaluation: run it now.
        run.evaluate(step)
        run.save_checkpoint()
    # A step's time is the interval between the ends of two consecutive steps: in a pipeline
    # that is the period, including any wait that falls outside train_step itself (e.g. the
    # timing collective). Evaluation and checkpoints are excluded by restarting the clock.
    run.restart_clock()
    with StopRequest(enabled=executor.accepts_stop) as stop:
        while not schedule.done(step) and not executor.stopped:
            for batch in executor.batches(run.data, *schedule.position(step)):
                result = run.train_step(step, batch, stop=stop.requested or should_stop())
                if executor.stopped:  # Ctrl-C or should_stop: the previous step was the last one
                    break
                run.account(step, result)  # loss window, step time
                step += 1
                run.advance(step)
                if schedule.is_log_point(step):
                    run.log(step)  # collective: the timings
                    if run.write_trace(step):  # collective, once: train.trace's timeline
                        run.restart_clock()  # its writing is not training time
                if schedule.is_checkpoint_point(step):
                    run.save_checkpoint()
                    run.restart_clock()
                if schedule.done(step):
                    break
            stopped = executor.stopped
            if not stopped and schedule.is_eval_point(step):
                run.evaluate(step)
            if schedule.ends_stretch_with_checkpoint(step, stopped):
                run.save_checkpoint()
            run.restart_clock()
    run.bar.close()
    interrupted = executor.stopped and not schedule.done(step)
    if interrupted:
        if executor.is_leader:
            log.info(f"interrupted at step {step}; checkpoint saved. Resume with "
                     f"`frzoo run --resume {run.out_dir}`.")
    elif schedule.needs_final_eval(step, run.progress.get("last_eval_step")):
        run.evaluate(step)
        run.save_checkpoint()
    run.write_trace(step, last=True)  # a run that ended inside the trace window
    return run.finish(step, interrupted)


class Run:
    """One process's run: the components the loop asks (schedule, executor, window, logger) and
    the progress a checkpoint keeps. Every method is one thing the loop does."""

    def __init__(self, cfg: DictConfig, out_dir: Path, pipeline: Pipeline, data: DataModule,
                 executor: Executor, probe: Optional[SigmaProbe]) -> None:
        self.cfg, self.out_dir, self.pipeline, self.data = cfg, out_dir, pipeline, data
        self.executor, self.probe = executor, probe
        self.recipe, self.partition = to_container(cfg), pipeline.partition.to_list()
        self.progress: Dict[str, Any] = {"step": 0, "best_test_acc1": None, "train_seconds": 0.0,
                                         "last_eval": None, "last_eval_step": None}
        self.window = metrics.Window()
        self.logger: Logger = NullLogger()
        self.resumed = False
        self.tick = time.perf_counter()
        self.mult = 1.0  # the lr factor of the last step taken
        trace = cfg.train.trace
        self.timeline = Timeline(TraceWindow(trace.start, trace.steps), executor,
                                 rundir.trace_path(out_dir)) if trace is not None else None

    def start(self, resume: bool, loggers: Sequence[Logger]) -> None:
        """Load the checkpoint (resume), write the run's files and open the loggers (leader)."""
        cfg, leader = self.cfg, self.executor.is_leader
        if resume:
            self.load(rundir.checkpoint_path(self.out_dir))
        self.writer = CheckpointWriter(rundir.checkpoints_dir(self.out_dir),
                                       self.executor.checkpoint_group,
                                       self.executor.publishes_checkpoints,
                                       cfg.train.checkpoint_async)
        self.schedule = Schedule.of(cfg.train, self.data.steps_per_epoch(),
                                    self.progress.get("lr_steps"))
        self.progress["lr_steps"] = self.schedule.lr_steps  # kept: a resume keeps the curve
        self.clock = metrics.RunClock(self.progress)
        step = self.progress["step"]
        self.bar = tqdm(total=self.schedule.total_steps, initial=step, unit="step",
                        dynamic_ncols=True, disable=not (cfg.train.progress and leader))
        if not leader:
            return
        note = self.schedule.horizon_note(cfg.optimizer.schedule, cfg.optimizer.lr)
        if note:
            log.info(note)
        window = self.timeline.window if self.timeline is not None else None
        if window is not None and window.start >= self.schedule.total_steps:
            log.warning(f"train.trace.start={window.start} is past this run's last step "
                        f"({self.schedule.total_steps - 1}): no trace.json is written. Choose a "
                        f"start below {self.schedule.total_steps}.")
        rundir.remove_partial_files(self.out_dir)  # we hold the run lock: no other writer exists
        save_recipe(cfg, self.out_dir / "recipe.yaml")
        table = self.pipeline.table()
        (self.out_dir / "partition.json").write_text(json.dumps(table, indent=2) + "\n")
        # A fresh start keeps no records of an earlier start killed before its first checkpoint.
        self.logger = MultiLogger([JsonlLogger(self.out_dir / "metrics.jsonl",
                                               resume_from_step=step if resume else -1),
                                   *loggers])
        # Trackers (W&B) open their run here: the partition is known, so it goes into the config.
        self.logger.start({"recipe": self.recipe, "partition": table, "step": step})

    def load(self, path: Path) -> None:
        """The newest complete checkpoint into the executor and the progress; says so where a
        newer save never completed (it is deleted once the run has started: rundir)."""
        checkpoint, leader = open_checkpoint(path), self.executor.is_leader
        meta = checkpoint.meta
        check_compatible(meta, self.recipe, path)
        carry = carries_layout(meta, self.recipe, self.partition)
        if not carry and isinstance(checkpoint, OldCheckpoint):
            raise FrzooError(f"'{path}' is a checkpoint of format 1, which resumes only with the "
                             f"split and algorithm it was written with; resume it once with its "
                             f"own recipe (its next checkpoint is of format 2), then change them.")
        self.executor.load_checkpoint(checkpoint, carry=carry)
        self.progress, self.resumed = dict(meta["progress"]), True
        partial = partial_saves(rundir.checkpoints_dir(self.out_dir))
        if partial and leader:
            log.info(f"the newest checkpoint save ({partial[-1]}) never completed (the run "
                     f"stopped while writing it); resuming from the last complete one, {path} "
                     f"(step {self.progress['step']}).")
        if not carry:
            self.progress.pop("part_seconds", None)  # the old parts' time totals
            if leader:
                k_parts, cls = len(self.partition), self.pipeline.algorithm_cls
                log.info(layout_note(meta, self.recipe, self.partition,
                                     [cls.staleness_of(k, k_parts) for k in range(k_parts)]))

    def restart_clock(self) -> None:
        self.tick = time.perf_counter()

    def train_step(self, step: int, batch: Any, *, stop: bool) -> Any:
        """Step `step` at its learning rate (scaled per part, e.g. the authors' [2, 1, 1, 1])."""
        cfg = self.cfg
        self.mult = self.schedule.lr_factor(step, cfg.optimizer.schedule)
        for algo in self.executor.algorithms:
            scale = self.pipeline.lr_scales[algo.index]
            set_lr(algo.optimizer, cfg.optimizer.lr * scale * self.mult)
        if self.probe is not None and batch is not None:  # sigma: true gradients at w^t
            self.probe.before_step(step, *batch)
        horizon = self.schedule.horizon(step)
        if self.timeline is None:
            return self.executor.train_step(batch, step, stop=stop, horizon=horizon)
        with self.timeline.step(step):  # recorded when train.trace's window covers it
            return self.executor.train_step(batch, step, stop=stop, horizon=horizon)

    def account(self, step: int, result: Any) -> None:
        """The step's loss into the window (the leader's result) and its time into the clocks."""
        if result is not None:  # the leader: loss and logits of the last part
            self.window.add(step, result.loss, result.logits, result.target)
            if self.schedule.is_log_point(step + 1):
                self.read_losses()  # waits for the device: the window's time is complete
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        self.window.seconds += seconds
        self.progress["train_seconds"] += seconds

    def advance(self, step: int) -> None:
        self.progress["step"] = step
        self.bar.update(1)

    def read_losses(self) -> None:
        """The window's losses, read from the device (where they stay between reads: reading
        each step would make the host wait for the device each step); a non-finite one stops
        training. Called at each log point and before each checkpoint, which so stays good."""
        bad = self.window.read()
        if bad is not None:
            raise NonFiniteLossError(
                f"the loss is {bad[1]} at step {bad[0]} (epoch "
                f"{bad[0] // self.schedule.steps_per_epoch}); training stopped. "
                f"{rundir.last_good_checkpoint(self.out_dir)}. Lower optimizer.lr or check the "
                f"data.")

    def log(self, step: int) -> None:
        """A log point: the timings (collective), then the leader's train record."""
        timings = self.executor.timing_window()  # collective
        if self.probe is not None and timings is not None:
            for k, row in enumerate(timings):
                sigma = self.probe.read(k)
                if sigma is not None:
                    row["sigma"] = sigma
        if not self.executor.is_leader:
            return
        metrics.accumulate(self.progress, timings, self.window.steps)
        record = self.window.record(timings, epoch=self.schedule.epoch(step),
                                    lr=self.cfg.optimizer.lr * self.mult,
                                    lr_scales=self.pipeline.lr_scales, clock=self.clock)
        self.logger.log(record, step)
        self.bar.set_postfix(loss=f"{record[metrics.TRAIN_LOSS]:.3f}",
                             acc=f"{record[metrics.TRAIN_ACC]:.1f}",
                             img_s=f"{record[metrics.IMAGES_PER_S]:.0f}")

    def write_trace(self, step: int, last: bool = False) -> bool:
        """Once the trace window is over (`last`: or the run ends inside it), gather every
        part's spans and write trace.json (collective: every process asks at the same step)."""
        if self.timeline is None or not self.timeline.due(step, last):
            return False
        self.timeline.write(self.executor.is_leader,
                            {"model": self.cfg.model.name, "algorithm": self.cfg.algorithm.name,
                             "num_parts": len(self.pipeline.parts)})
        return True

    def save_checkpoint(self) -> None:
        self.read_losses()
        self.clock.fields()  # the wall clock into the progress: a resumed run continues it
        entries = self.executor.checkpoint_entries()  # this process's parts only
        # counted on every process alike: the save's temporary folder has the same name on all
        self.progress["saves"] = saves = self.progress.get("saves", 0) + 1
        if self.executor.is_leader:
            entries.update(meta_entry(recipe=self.recipe, partition=self.partition,
                                      progress=self.progress,
                                      replicas=self.cfg.distributed.replicas))
        with self.executor.saving():  # every process writes its own entries
            self.writer.save(entries, self.progress["step"], saves)

    def evaluate(self, step: int) -> None:
        evaluation = self.executor.evaluate(self.data)  # collective; metrics arrive on the leader
        progress = self.progress
        progress["last_eval_step"] = step  # on every process: they must take the same branches
        if evaluation is None:
            return
        progress["last_eval"] = {"step": step, **evaluation}
        best = progress["best_test_acc1"]
        progress["best_test_acc1"] = (evaluation["test_acc1"] if best is None
                                      else max(best, evaluation["test_acc1"]))
        self.logger.log(metrics.eval_record(evaluation, epoch=self.schedule.epoch(step),
                                            train_seconds=progress["train_seconds"]), step)

    def finish(self, step: int, interrupted: bool) -> Dict[str, Any]:
        """The weights (collective export), then on the leader final.pt and summary.json."""
        with self.executor.saving():  # the last save complete and published before the end
            self.writer.wait()
        exported = self.executor.gather_export()  # collective
        summary = summary_of(self.cfg, self.progress, step, interrupted,
                             num_parts=len(self.pipeline.parts),
                             epochs=self.schedule.epoch(step))
        if self.executor.is_leader:
            for k, shares in enumerate(summary["part_time_share"]):
                log.info(f"part {k + 1}: " + ", ".join(f"{phase} {100 * v:.0f}%"
                                                       for phase, v in shares.items()))
            atomic_save(export_state_dict(exported or []), self.out_dir / "final.pt")
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.logger.summary(summary)
            self.logger.finish()
        return summary


def summary_of(cfg: DictConfig, progress: Dict[str, Any], step: int, interrupted: bool, *,
               num_parts: int, epochs: float) -> Dict[str, Any]:
    """summary.json: what the run did, from its progress."""
    return {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "num_parts": num_parts,
        "executor": cfg.executor, "steps": step, "epochs": epochs,
        "interrupted": interrupted, "train_seconds": progress["train_seconds"],
        "images_per_s": step * cfg.data.batch_size / max(progress["train_seconds"], 1e-9),
        "best_test_acc1": progress["best_test_acc1"],
        "part_time_share": metrics.time_shares(progress),
        "part_memory_bytes": [{k: int(v) for k, v in phases.items() if k.endswith("_bytes")}
                              for phases in progress.get("part_seconds", [])],
        **{f"final_{k}": v for k, v in (progress["last_eval"] or {}).items() if k != "step"},
    }
