"""The training loop: steps, schedule, evaluation, checkpoints, metrics. Reads top to bottom.

The global step is the only position: epoch and batch follow from it (every epoch has the same
number of steps), the learning rate is a function of it, and dropout/augmentation are seeded from
it. That is what makes a resumed run equal, bit for bit, to one that never stopped.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from .build import Job, build_job
from .checkpoint import (atomic_save, check_compatible, checkpoint_state, export_state_dict,
                         load_file, restore)
from .config import save_recipe, to_container
from .data import DataModule, build_data
from .errors import FrzooError, NonFiniteLossError
from .executors import LocalExecutor
from .loggers import JsonlLogger, Logger, MultiLogger
from .optim import lr_multiplier, set_lr


# ---------------------------------------------------------------- run folder
def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / "last.pt"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Refuse to let two runs write into one folder at the same time."""
    lock = out_dir / ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = lock.read_text().strip() or "?"
        alive = pid.isdigit() and _pid_alive(int(pid))
        if alive:
            raise FrzooError(f"run folder '{out_dir}' is in use by another frzoo run (pid {pid}); "
                             f"choose another run.out_dir.") from None
        lock.unlink()  # left behind by a run that was killed
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def prepare_out_dir(out_dir: Path, resume: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise FrzooError(f"run.out_dir '{out_dir}' is not writable ({exc.strerror}); "
                         f"choose another folder.") from None
    if not resume and checkpoint_path(out_dir).exists():
        raise FrzooError(f"run.out_dir '{out_dir}' already holds a run; resume it with "
                         f"`frzoo run --resume {out_dir}` or set run.out_dir to a new folder.")
    if resume and not checkpoint_path(out_dir).exists():
        raise FrzooError(f"nothing to resume in '{out_dir}': {checkpoint_path(out_dir)} "
                         f"does not exist.")


class StopRequest:
    """Ctrl-C sets a flag; the loop finishes the current step, checkpoints and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, *_: Any) -> None:
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(executor: LocalExecutor, data: DataModule) -> Dict[str, float]:
    """Test loss, top-1 and (more than 5 classes) top-5 accuracy, in percent."""
    total = loss_sum = top1 = top5 = 0.0
    for x, y in data.test_batches():
        logits = executor.predict(x).float().cpu()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += float((best[:, 0] == y).sum())
        top5 += float((best == y[:, None]).any(dim=1).sum())
        total += len(y)
    out = {"test_loss": loss_sum / max(total, 1), "test_acc1": 100 * top1 / max(total, 1)}
    if data.info.num_classes > 5:
        out["test_acc5"] = 100 * top5 / max(total, 1)
    return out


# ---------------------------------------------------------------- training
def train(cfg: DictConfig, out_dir: Path, *, resume: bool = False,
          loggers: Sequence[Logger] = (), echo: Any = print) -> Dict[str, Any]:
    """Train the recipe into `out_dir` (resuming from its checkpoint if `resume`)."""
    prepare_out_dir(out_dir, resume)
    with run_lock(out_dir):
        return _train(cfg, out_dir, resume, loggers, echo)


def _train(cfg: DictConfig, out_dir: Path, resume: bool, loggers: Sequence[Logger],
           echo: Any) -> Dict[str, Any]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = build_data(cfg.data, cfg.train.seed)
    job = build_job(cfg, data.info)
    executor = LocalExecutor(job.algorithms)
    recipe, partition = to_container(cfg), job.partition.to_list()
    progress: Dict[str, Any] = {"step": 0, "best_test_acc1": None, "train_seconds": 0.0,
                                "last_eval": None}
    if resume:
        state = load_file(checkpoint_path(out_dir))
        check_compatible(state, recipe, partition, checkpoint_path(out_dir))
        restore(state, job.algorithms)
        executor.load_state_dict(state["executor"])
        progress = state["progress"]
    save_recipe(cfg, out_dir / "recipe.yaml")
    (out_dir / "partition.json").write_text(json.dumps(partition_table(job), indent=2) + "\n")

    def save_checkpoint() -> None:
        atomic_save(checkpoint_state(recipe=recipe, partition=partition,
                                     algorithms=job.algorithms,
                                     executor_state=executor.state_dict(), progress=progress),
                    checkpoint_path(out_dir))

    logger = MultiLogger([JsonlLogger(out_dir / "metrics.jsonl",
                                      resume_from_step=progress["step"] if resume else None),
                          *loggers])
    steps_per_epoch = data.steps_per_epoch()
    if steps_per_epoch == 0:
        raise FrzooError(f"data.batch_size={cfg.data.batch_size} with drop_last leaves no full "
                         f"batch in {data.info.num_train} training samples; lower the batch size.")
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    step = progress["step"]
    bar = _progress_bar(cfg.train.progress, total_steps, step)
    window = _Window()
    interrupted = False
    with StopRequest() as stop:
        while step < total_steps and not interrupted:
            epoch, first_batch = divmod(step, steps_per_epoch)
            for x, y in data.train_batches(epoch, first_batch):
                # The learning rate of step t, scaled per part (e.g. the authors' [2, 1, 1, 1]).
                mult = lr_multiplier(step, steps_per_epoch, total_steps, cfg.optimizer.schedule)
                for algo, scale in zip(job.algorithms, job.lr_scales):
                    set_lr(algo.optimizer, cfg.optimizer.lr * scale * mult)
                start = time.perf_counter()
                result = executor.train_step(x, y, step)
                loss = float(result.loss)  # syncs the device: the step's time is complete
                seconds = time.perf_counter() - start
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss is {loss} at step {step} (epoch {epoch}); training stopped. "
                        f"The last good checkpoint is {checkpoint_path(out_dir)} (step "
                        f"{_saved_step(out_dir)}). Lower optimizer.lr or check the data.")
                step += 1
                progress["step"] = step
                progress["train_seconds"] += seconds
                correct = int((result.logits.argmax(1).cpu() == y).sum())
                window.add(loss, correct, len(y), seconds, executor.timings)
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    record = window.flush()
                    record.update(epoch=step / steps_per_epoch,
                                  lr=cfg.optimizer.lr * mult,
                                  **{f"lr_part{k + 1}": cfg.optimizer.lr * s * mult
                                     for k, s in enumerate(job.lr_scales)})
                    logger.log({"kind": "train", **record}, step)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.1f}",
                                    img_s=f"{record['images_per_s']:.0f}")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    save_checkpoint()
                if step >= total_steps or stop.requested:
                    break
            interrupted = stop.requested and step < total_steps
            epoch_done = step % steps_per_epoch == 0
            if epoch_done and cfg.train.eval_every and (step // steps_per_epoch) % cfg.train.eval_every == 0:
                _record_eval(executor, data, logger, progress, step, steps_per_epoch)
            if epoch_done or interrupted or step >= total_steps:
                save_checkpoint()
    bar.close()
    if interrupted:
        echo(f"interrupted at step {step}; checkpoint saved. Resume with "
             f"`frzoo run --resume {out_dir}`.")
    elif progress["last_eval"] is None or progress["last_eval"]["step"] != step:
        _record_eval(executor, data, logger, progress, step, steps_per_epoch)
        save_checkpoint()
    final = export_state_dict([p.original_state_dict() for p in job.parts])
    atomic_save(final, out_dir / "final.pt")
    summary = {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "num_parts": len(job.parts),
        "steps": step, "epochs": step / steps_per_epoch, "interrupted": interrupted,
        "train_seconds": progress["train_seconds"],
        "images_per_s": step * cfg.data.batch_size / max(progress["train_seconds"], 1e-9),
        "best_test_acc1": progress["best_test_acc1"],
        **{f"final_{k}": v for k, v in (progress["last_eval"] or {}).items() if k != "step"},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.summary(summary)
    logger.finish()
    return summary


def _record_eval(executor: LocalExecutor, data: DataModule, logger: Logger,
                 progress: Dict[str, Any], step: int, steps_per_epoch: int) -> None:
    metrics = evaluate(executor, data)
    progress["last_eval"] = {"step": step, **metrics}
    best = progress["best_test_acc1"]
    progress["best_test_acc1"] = metrics["test_acc1"] if best is None else max(best, metrics["test_acc1"])
    logger.log({"kind": "eval", "epoch": step / steps_per_epoch, **metrics}, step)


def _saved_step(out_dir: Path) -> str:
    path = checkpoint_path(out_dir)
    if not path.exists():
        return "none: no checkpoint was written yet"
    return str(torch.load(path, map_location="cpu", weights_only=True)["progress"]["step"])


class _Window:
    """Running sums between two metrics records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.correct = self.count = self.seconds = self.steps = 0.0
        self.part_seconds: Dict[str, float] = {}

    def add(self, loss: float, correct: int, count: int, seconds: float,
            timings: List[Dict[str, float]]) -> None:
        self.loss += loss
        self.correct += correct
        self.count += count
        self.seconds += seconds
        self.steps += 1
        for k, timing in enumerate(timings):
            for phase, value in timing.items():
                key = f"part{k + 1}_{phase}_s"
                self.part_seconds[key] = self.part_seconds.get(key, 0.0) + value

    def flush(self) -> Dict[str, float]:
        steps = max(self.steps, 1)
        out = {"loss": self.loss / steps, "acc": 100 * self.correct / max(self.count, 1),
               "images_per_s": self.count / max(self.seconds, 1e-9),
               **{k: v / steps for k, v in self.part_seconds.items()}}
        self.reset()
        return out


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def partition_table(job: Job) -> List[Dict[str, Any]]:
    """Per part: modules, parameter count, output shape, device, history length."""
    rows = []
    for k, (part, algo) in enumerate(zip(job.parts, job.algorithms)):
        rows.append({
            "part": k + 1,
            "modules": part.names,
            "params": sum(p.numel() for p in part.parameters()),
            "output_shape": list(job.report.shapes[k]) if k < len(job.report.shapes) else None,
            "device": str(job.devices[k]),
            "history": algo.history_length,
            "staleness": algo.staleness,
        })
    return rows
