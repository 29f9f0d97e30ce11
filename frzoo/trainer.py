"""The training loop: steps, schedule, evaluation, checkpoints, metrics. Reads top to bottom.

The global step is the only position: epoch and batch follow from it (every epoch has the same
number of steps), the learning rate is a function of it, and dropout/augmentation are seeded from
it. That is what makes a resumed run equal, bit for bit, to one that never stopped.
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
from .checkpoint import (atomic_save, check_compatible, checkpoint_state, export_state_dict,
                         load_file)
from .config import save_recipe, to_container
from .data import DataModule
from .errors import FrzooError, NonFiniteLossError
from .executors.base import Executor
from .logging import JsonlLogger, Logger, MultiLogger, NullLogger
from .optim import lr_multiplier, set_lr
from .sigma import SigmaProbe
from .stop import StopRequest


def run_loop(cfg: DictConfig, out_dir: Path, resume: bool, *, pipeline: Pipeline, data: DataModule,
             executor: Executor, loggers: Sequence[Logger] = (), echo: Any = print,
             probe: Optional[SigmaProbe] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """The loop every process runs. Only the leader (the process holding the last part) logs and
    writes files; evaluation, checkpoints and timings are collective calls of the executor."""
    try:
        return _run_loop(cfg, out_dir, resume, pipeline=pipeline, data=data, executor=executor,
                         loggers=loggers, echo=echo, probe=probe,
                         should_stop=should_stop or (lambda: False))
    except OSError as exc:  # a full disk at any write (metrics, summary ...): say so, one line
        if exc.errno not in rundir.DISK_ERRORS:
            raise
        where = f" writing '{exc.filename}'" if exc.filename else ""
        raise FrzooError(f"run.out_dir '{out_dir}' cannot be written{where} ({exc.strerror}); "
                         f"training stopped. Free space. {rundir.last_good_checkpoint(out_dir)}."
                         ) from None


def _run_loop(cfg: DictConfig, out_dir: Path, resume: bool, *, pipeline: Pipeline, data: DataModule,
              executor: Executor, loggers: Sequence[Logger], echo: Any,
              probe: Optional[SigmaProbe], should_stop: Callable[[], bool]) -> Dict[str, Any]:
    leader = executor.is_leader
    recipe, partition = to_container(cfg), pipeline.partition.to_list()
    progress: Dict[str, Any] = {"step": 0, "best_test_acc1": None, "train_seconds": 0.0,
                                "last_eval": None, "last_eval_step": None}
    if resume:
        state = load_file(rundir.checkpoint_path(out_dir))
        check_compatible(state, recipe, partition, rundir.checkpoint_path(out_dir))
        executor.load_checkpoint(state)
        progress = state["progress"]
    clock = metrics.RunClock(progress)
    table = pipeline.table()
    if leader:
        rundir.remove_partial_files(out_dir)  # we hold the run lock: no other writer exists
        save_recipe(cfg, out_dir / "recipe.yaml")
        (out_dir / "partition.json").write_text(json.dumps(table, indent=2) + "\n")

    window = metrics.Window()

    def read_losses() -> None:
        """The window's losses, read from the device (where they stay between reads: reading
        each step would make the host wait for the device each step); a non-finite one stops
        training. Called at each log point and before each checkpoint, which so stays good."""
        bad = window.read()
        if bad is not None:
            raise NonFiniteLossError(
                f"the loss is {bad[1]} at step {bad[0]} (epoch {bad[0] // steps_per_epoch}); "
                f"training stopped. {rundir.last_good_checkpoint(out_dir)}. Lower "
                f"optimizer.lr or check the data.")

    def save_checkpoint() -> None:
        read_losses()
        clock.fields()  # the wall clock into the progress: a resumed run continues it
        gathered = executor.gather_checkpoint()  # collective: every process calls it
        if gathered is not None:
            parts, executor_state = gathered
            atomic_save(checkpoint_state(recipe=recipe, partition=partition, parts=parts,
                                         executor_state=executor_state, progress=progress),
                        rundir.checkpoint_path(out_dir))

    logger: Logger = NullLogger()
    if leader:
        # A fresh start keeps no records of an earlier start killed before its first checkpoint.
        logger = MultiLogger([JsonlLogger(out_dir / "metrics.jsonl",
                                          resume_from_step=progress["step"] if resume else -1),
                              *loggers])
        # Trackers (W&B) open their run here: the partition is known, so it goes into the config.
        logger.start({"recipe": recipe, "partition": table, "step": progress["step"]})
    steps_per_epoch = data.steps_per_epoch()
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    step = progress["step"]
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress and leader))
    if resume and 0 < step < total_steps and step % steps_per_epoch == 0 \
            and progress.get("last_eval_step") != step and cfg.train.eval_every \
            and (step // steps_per_epoch) % cfg.train.eval_every == 0:
        # The checkpoint was written at the epoch's end, before its evaluation: run it now.
        _record_eval(executor, data, logger, progress, step, steps_per_epoch)
        save_checkpoint()
    # A step's time is the interval between the ends of two consecutive steps: in a pipeline
    # that is the period, including any wait that falls outside train_step itself (e.g. the
    # timing collective). Evaluation and checkpoints are excluded by restarting the clock.
    tick = time.perf_counter()
    with StopRequest(enabled=executor.accepts_stop) as stop:
        while step < total_steps and not executor.stopped:
            epoch, first_batch = divmod(step, steps_per_epoch)
            for batch in executor.batches(data, epoch, first_batch):
                # The learning rate of step t, scaled per part (e.g. the authors' [2, 1, 1, 1]).
                mult = lr_multiplier(step, steps_per_epoch, total_steps, cfg.optimizer.schedule)
                for algo in executor.algorithms:
                    set_lr(algo.optimizer, cfg.optimizer.lr * pipeline.lr_scales[algo.index] * mult)
                if probe is not None and batch is not None:  # sigma: true gradients at w^t
                    probe.before_step(step, *batch)
                # The steps up to the next log point or epoch end follow with nothing else in
                # between: the distributed executor posts their receives ahead.
                horizon = min(total_steps, (step // steps_per_epoch + 1) * steps_per_epoch,
                              (step // cfg.train.log_every + 1) * cfg.train.log_every)
                result = executor.train_step(batch, step, stop=stop.requested or should_stop(),
                                             horizon=horizon)
                if executor.stopped:  # Ctrl-C or should_stop: the previous step was the last one
                    break
                if result is not None:  # the leader: loss and logits of the last part
                    window.add(step, result.loss, result.logits, result.target)
                    if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps:
                        read_losses()  # waits for the device: the window's time is complete
                now = time.perf_counter()
                seconds, tick = now - tick, now
                window.seconds += seconds
                progress["train_seconds"] += seconds
                step += 1
                progress["step"] = step
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    timings = executor.timing_window()  # collective
                    if probe is not None and timings is not None:
                        for k, row in enumerate(timings):
                            sigma = probe.read(k)
                            if sigma is not None:
                                row["sigma"] = sigma
                    if leader:
                        metrics.accumulate(progress, timings, window.steps)
                        record = window.record(timings, epoch=step / steps_per_epoch,
                                               lr=cfg.optimizer.lr * mult,
                                               lr_scales=pipeline.lr_scales, clock=clock)
                        logger.log(record, step)
                        bar.set_postfix(loss=f"{record[metrics.TRAIN_LOSS]:.3f}",
                                        acc=f"{record[metrics.TRAIN_ACC]:.1f}",
                                        img_s=f"{record[metrics.IMAGES_PER_S]:.0f}")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    save_checkpoint()
                    tick = time.perf_counter()
                if step >= total_steps:
                    break
            epoch_done = step % steps_per_epoch == 0 and not executor.stopped
            if epoch_done and cfg.train.eval_every and (step // steps_per_epoch) % cfg.train.eval_every == 0:
                _record_eval(executor, data, logger, progress, step, steps_per_epoch)
            if epoch_done or executor.stopped or step >= total_steps:
                save_checkpoint()
            tick = time.perf_counter()
    bar.close()
    interrupted = executor.stopped and step < total_steps
    if interrupted:
        if leader:
            echo(f"interrupted at step {step}; checkpoint saved. Resume with "
                 f"`frzoo run --resume {out_dir}`.")
    elif progress.get("last_eval_step") != step:
        _record_eval(executor, data, logger, progress, step, steps_per_epoch)
        save_checkpoint()
    exported = executor.gather_export()  # collective
    summary = {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "num_parts": len(pipeline.parts),
        "executor": cfg.executor, "steps": step, "epochs": step / steps_per_epoch,
        "interrupted": interrupted, "train_seconds": progress["train_seconds"],
        "images_per_s": step * cfg.data.batch_size / max(progress["train_seconds"], 1e-9),
        "best_test_acc1": progress["best_test_acc1"],
        "part_time_share": metrics.time_shares(progress),
        "part_memory_bytes": [{k: int(v) for k, v in phases.items() if k.endswith("_bytes")}
                              for phases in progress.get("part_seconds", [])],
        **{f"final_{k}": v for k, v in (progress["last_eval"] or {}).items() if k != "step"},
    }
    if leader:
        for k, shares in enumerate(summary["part_time_share"]):
            echo(f"part {k + 1}: " + ", ".join(f"{phase} {100 * v:.0f}%" for phase, v in shares.items()))
        atomic_save(export_state_dict(exported or []), out_dir / "final.pt")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.summary(summary)
        logger.finish()
    return summary


def _record_eval(executor: Executor, data: DataModule, logger: Logger,
                 progress: Dict[str, Any], step: int, steps_per_epoch: int) -> None:
    evaluation = executor.evaluate(data)  # collective; the metrics arrive on the leader
    progress["last_eval_step"] = step  # on every process: they must take the same branches
    if evaluation is None:
        return
    progress["last_eval"] = {"step": step, **evaluation}
    best = progress["best_test_acc1"]
    progress["best_test_acc1"] = evaluation["test_acc1"] if best is None else max(best, evaluation["test_acc1"])
    logger.log(metrics.eval_record(evaluation, epoch=step / steps_per_epoch,
                                   train_seconds=progress["train_seconds"]), step)
