"""Where metrics go. A small interface; the trainer does not know which loggers are behind it.

Every logger gets the same records (frzoo.metrics: built once, in their final names) and writes
them as they are. ``metrics.jsonl`` in the run folder is always written: it is the run's own
record, readable without any service. Experiment trackers (W&B: frzoo.logging.wandb) are further
loggers behind the same interface.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence


class Logger:
    """Interface. `step` is the global training step the record belongs to."""

    def start(self, config: Dict[str, Any]) -> None:  # pragma: no cover - interface
        """Called once before the first record, when the partition is known. `config` holds
        "recipe" (the resolved recipe), "partition" (the partition table, one row per part) and
        "step" (where training starts: 0, or the resumed step)."""

    def log(self, record: Dict[str, Any], step: int) -> None:  # pragma: no cover - interface
        """One record of frzoo.metrics: {"kind": "train"|"eval", metric name: value, ...}."""

    def summary(self, values: Dict[str, Any]) -> None:  # pragma: no cover - interface
        """The run's summary.json, once, at the end."""

    def finish(self) -> None:  # pragma: no cover - interface
        """The run ended normally."""

    def abort(self) -> None:
        """The run failed before the trainer could finish the logger (see close_loggers)."""
        self.finish()


class NullLogger(Logger):
    """Stands in when logging is off, so the trainer never checks."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    return value


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line, or None for a blank or cut-off one (a full disk, a kill)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class JsonlLogger(Logger):
    """One JSON object per line: {"step": ..., "kind": "train"|"eval", metric name: value, ...}."""

    def __init__(self, path: Path, resume_from_step: Optional[int] = None) -> None:
        self.path = path
        if resume_from_step is not None and path.exists():
            # Records written after the checkpoint we resume from would be repeated: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(path, "a", buffering=1)

    def log(self, record: Dict[str, Any], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in record.items()}}) + "\n")

    def finish(self) -> None:
        self._fh.close()


class MultiLogger(Logger):
    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers: List[Logger] = list(loggers)

    def start(self, config: Dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.start(config)

    def log(self, record: Dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(record, step)

    def summary(self, values: Dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_loggers(cfg_logging: Any, *, out_dir: Path, resume: bool = False,
                  leader: bool = True,
                  echo: Optional[Callable[[str], None]] = None) -> List[Logger]:
    """The experiment trackers a recipe's `logging:` section asks for (metrics.jsonl is the
    trainer's own and always written).

    A training job is one W&B run, never one per part: in a one-process-per-part runtime call
    this in every process with `leader` telling whether it is the process that logs (the one
    holding the last part); the others get no trackers. The W&B run itself opens only in
    `Logger.start`, which the trainer calls in the leader alone.
    """
    if not leader or not cfg_logging.wandb or cfg_logging.mode == "disabled":
        return []
    from .wandb import WandbLogger  # imports wandb: only when asked for
    return [WandbLogger.from_config(cfg_logging, out_dir=Path(out_dir), resume=resume, echo=echo)]


def close_loggers(loggers: Sequence[Logger], *, failed: bool = False) -> None:
    """Close loggers the trainer could not close because it raised; `failed` marks the run so."""
    for logger in loggers:
        if failed:
            logger.abort()
        else:
            logger.finish()


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
