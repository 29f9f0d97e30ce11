"""The metrics schema: every record a run writes, built once, under the names everyone reads.

A record is a flat dict: ``kind`` ("train" or "eval") plus metrics named as W&B shows them
(``train/loss``, ``part2/forward_s``, ``test/acc1``, ``epoch``, ``time/train_s``). metrics.jsonl
stores it with its ``step``, the W&B adapter logs it as it is, sweeps rank trials by these names
and ``frzoo report`` plots them: the names are built here and nowhere parses them back.

The run's totals (seconds and peak bytes per part and phase, for summary.json) are kept here too,
in the executors' own keys (``forward``, ``wait``, ``params_bytes`` ...), which summary.json uses.
"""
from __future__ import annotations

import difflib
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

KIND = "kind"  # "train" or "eval": what a record is; the rest of a record is its metrics
TRAIN, EVAL = "train", "eval"

# A part's step time, as the executors report it per part (mean seconds per step of a window).
PHASES = ("forward", "replay", "backward", "input_gradient", "weight_gradient",
          "optimizer")  # timed by the part's algorithm
# zb1's halves of the backward (frzoo.algorithms.pipelines): shown only where they ran
SPLIT_BACKWARD = ("input_gradient", "weight_gradient")
WAIT = "wait"  # waiting for another part's message (one process per part)
STEP = "step"  # the whole step; what no phase covers is "other"
BREAKDOWN = (*PHASES, WAIT, "other")  # the shares of a part's step time, in display order
SIGMA = "sigma"  # a ratio over the window (train.sigma_every), not seconds
# fp16 (frzoo/loss_scale.py): optimizer steps a part skipped in the window (a count), and the last
# part's loss scale at the window's end, logged as train/loss_scale.
SKIPPED, LOSS_SCALE = "skipped", "loss_scale"
NOT_SECONDS = (SIGMA, SKIPPED, LOSS_SCALE)  # per-part values that are not phase times
PEAK_ALLOCATED = "peak_allocated_bytes"  # the part's CUDA device peak in the window
MIB = 2 ** 20

EPOCH = "epoch"  # in every record: one x-axis for train and eval
TRAIN_LOSS, TRAIN_ACC, TRAIN_LR = "train/loss", "train/acc", "train/lr"
IMAGES_PER_S = "train/images_per_s"
TEST_LOSS, TEST_ACC1, TEST_ACC5 = "test/loss", "test/acc1", "test/acc5"
TRAIN_LOSS_SCALE = "train/loss_scale"  # fp16 only
TRAIN_S = "time/train_s"  # training seconds so far (no evaluation or checkpoints), as train_seconds
# Seconds since the run started (all sessions of a resumed run summed); in train records only: an
# eval record at the same step would give the name a second value there (W&B keeps one per step).
WALL_S = "time/wall_s"
# What evaluation returns (frzoo.executors.base.EvalTotals; summary.json's final_* keys) -> names.
EVAL_NAMES = {"test_loss": TEST_LOSS, "test_acc1": TEST_ACC1, "test_acc5": TEST_ACC5}

# The names every run's records have (partK/* come per part; train/loss_scale in fp16 runs
# only), and what each part may carry.
HISTORY_METRICS = (TRAIN_LOSS, TRAIN_ACC, IMAGES_PER_S, TRAIN_LR, *EVAL_NAMES.values(),
                   EPOCH, TRAIN_S, WALL_S, TRAIN_LOSS_SCALE)
PART_METRICS = ("lr", *(f"{phase}_s" for phase in (*PHASES, WAIT, STEP)), SIGMA, SKIPPED,
                "params_bytes", "optimizer_bytes", "peak_activation_bytes", PEAK_ALLOCATED,
                "max_memory_allocated_mb")
# summary.json keys a sweep may rank by.
SUMMARY_METRICS = ("best_test_acc1", "final_test_loss", "final_test_acc1", "final_test_acc5",
                   "train_seconds", "images_per_s", "steps", "epochs")


def part(k: int | str, name: str) -> str:
    """The name of part k's metric (k from 1, as in the paper): part(2, "lr") is "part2/lr"."""
    return f"part{k}/{name}"


def values(record: Dict[str, Any]) -> Dict[str, Any]:
    """A record's metrics: everything but its kind (what W&B logs, what sweeps follow)."""
    return {key: value for key, value in record.items() if key != KIND}


def _part_window(k: int, timings: Dict[str, float]) -> Dict[str, float]:
    """Part k's window as metrics: seconds get `_s`; bytes, sigma and skipped keep their names;
    the loss scale is the run's (`train/loss_scale`). The CUDA peak is also given in MiB under
    the name W&B dashboards know (`max_memory_allocated_mb`)."""
    out = {part(k, key if key.endswith("_bytes") or key in NOT_SECONDS else f"{key}_s"): value
           for key, value in timings.items() if key != LOSS_SCALE}
    if LOSS_SCALE in timings:
        out[TRAIN_LOSS_SCALE] = timings[LOSS_SCALE]
    if PEAK_ALLOCATED in timings:
        out[part(k, "max_memory_allocated_mb")] = timings[PEAK_ALLOCATED] / MIB
    return out


class RunClock:
    """The run's clocks, kept in the checkpoint's progress so that a resumed run continues them:
    `train_seconds` (the trainer adds each step's time) and `wall_seconds` (this clock)."""

    def __init__(self, progress: Dict[str, Any]) -> None:
        self.progress = progress
        self._start = time.perf_counter() - progress.get("wall_seconds", 0.0)

    def fields(self) -> Dict[str, float]:
        """Both clocks now, as record fields (and wall_seconds updated in the progress)."""
        self.progress["wall_seconds"] = time.perf_counter() - self._start
        return {TRAIN_S: self.progress["train_seconds"], WALL_S: self.progress["wall_seconds"]}


class Window:
    """Running sums between two train records. Each step's loss and count of correct
    predictions stay on the device until :meth:`read` (reading them each step would make the
    host wait for the device each step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.correct = self.count = self.seconds = self.steps = 0.0
        self.pending: List[Tuple[int, Tensor]] = []  # (step, [loss, correct]) on the device

    def add(self, step: int, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        correct = (logits.argmax(1) == target).sum()
        self.pending.append((step, torch.stack([loss.float(), correct.float()])))
        self.count += len(target)
        self.steps += 1

    def read(self) -> Optional[Tuple[int, float]]:
        """Add the pending values (one wait for the device); the first (step, non-finite loss)."""
        values = torch.stack([v for _, v in self.pending]).tolist() if self.pending else []
        steps = [s for s, _ in self.pending]
        self.pending = []
        for step, (loss, correct) in zip(steps, values):
            if not math.isfinite(loss):
                return step, loss
            self.loss += loss
            self.correct += correct
        return None

    def record(self, timings: Optional[List[Dict[str, float]]], *, epoch: float, lr: float,
               lr_scales: Sequence[float], clock: RunClock) -> Dict[str, Any]:
        """The train record of the window, then a new window. `timings` are per part mean
        seconds per step per phase (and bytes, sigma), as Executor.timing_window returns them;
        `lr` is the base learning rate and `lr_scales` each part's factor."""
        steps = max(self.steps, 1)
        out: Dict[str, Any] = {
            KIND: TRAIN, EPOCH: epoch, TRAIN_LOSS: self.loss / steps,
            TRAIN_ACC: 100 * self.correct / max(self.count, 1),
            IMAGES_PER_S: self.count / max(self.seconds, 1e-9), TRAIN_LR: lr,
            **{part(k + 1, "lr"): lr * scale for k, scale in enumerate(lr_scales)}}
        for k, phases in enumerate(timings or []):
            out.update(_part_window(k + 1, phases))
        out.update(clock.fields())
        self.reset()
        return out


def eval_record(evaluation: Dict[str, float], *, epoch: float,
                train_seconds: float) -> Dict[str, Any]:
    """The eval record of what Executor.evaluate returned."""
    return {KIND: EVAL, EPOCH: epoch,
            **{EVAL_NAMES[key]: value for key, value in evaluation.items()},
            TRAIN_S: train_seconds}


# ---------------------------------------------------------------- the run's totals
def accumulate(progress: Dict[str, Any], timings: Optional[List[Dict[str, float]]],
               steps: float) -> None:
    """Add a window's per-part seconds (means per step x steps) to the run's totals."""
    totals = progress.setdefault("part_seconds", [])
    for k, phases in enumerate(timings or []):
        if len(totals) <= k:
            totals.append({})
        for phase, value in phases.items():
            if phase in NOT_SECONDS:  # a ratio, a count, a scale: logged, not summed
                continue
            if phase.endswith("_bytes"):  # memory: the run's peak, not a sum
                totals[k][phase] = max(totals[k].get(phase, 0.0), value)
            else:
                totals[k][phase] = totals[k].get(phase, 0.0) + value * steps


def time_shares(progress: Dict[str, Any]) -> List[Dict[str, float]]:
    """Per part, the share of its steps' wall time spent in each phase ("part 2 waited 31%");
    `other` is the rest (transfers, Python, the executor's own work)."""
    shares = []
    for phases in progress.get("part_seconds", []):
        wall = max(phases.get(STEP, 0.0), 1e-9)
        row = {phase: value / wall for phase, value in phases.items()
               if phase != STEP and not phase.endswith("_bytes")
               and (value or phase not in SPLIT_BACKWARD)}
        row["other"] = max(0.0, 1.0 - sum(row.values()))
        shares.append(row)
    return shares


# ---------------------------------------------------------------- names a sweep may rank by
def check_metric_name(name: str) -> Optional[str]:
    """None when a sweep may rank by `name`; else why not, with the closest known names.

    Known: the history metrics, `partK/<metric>` for any part K, and summary.json's keys. A
    name one typo away from a known one gets the suggestion (`test/acc` -> `test/acc1`).
    """
    known = (*HISTORY_METRICS, *SUMMARY_METRICS)
    section, _, metric = name.partition("/")
    k = section[len("part"):] if section.startswith("part") else ""
    k = k if k.isdigit() and int(k) > 0 else ""
    if name in known or (k and metric in PART_METRICS):
        return None
    candidates = (*known, *(part(k or 1, m) for m in PART_METRICS))
    close = sorted(difflib.get_close_matches(name, candidates, n=2, cutoff=0.8))
    if close:
        return (f"metric '{name}' is not a name frzoo logs. Did you mean "
                + " or ".join(f"'{c}'" for c in close) + "?")
    return (f"metric '{name}' is not a name frzoo logs: use a W&B metric name "
            f"({', '.join(HISTORY_METRICS)}, partK/{{{', '.join(PART_METRICS)}}}) or a summary "
            f"key ({', '.join(SUMMARY_METRICS)}).")
