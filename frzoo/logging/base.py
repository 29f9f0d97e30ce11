"""The logger interface, and the loggers every run has: metrics.jsonl, the fan-out, the null one."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


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
