"""Where metrics go. A small interface; the trainer does not know which loggers are behind it.

``metrics.jsonl`` in the run folder is always written: it is the run's own record, readable
without any service. Experiment trackers are further loggers behind the same interface.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


class Logger:
    """Interface. `step` is the global training step the record belongs to."""

    def log(self, record: Dict[str, Any], step: int) -> None:  # pragma: no cover - interface
        pass

    def summary(self, values: Dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def finish(self) -> None:  # pragma: no cover - interface
        pass


class NullLogger(Logger):
    """Stands in when logging is off, so the trainer never checks."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    return value


class JsonlLogger(Logger):
    """One JSON object per line: {"step": ..., "kind": "train"|"eval"|..., ...}."""

    def __init__(self, path: Path, resume_from_step: Optional[int] = None) -> None:
        self.path = path
        if resume_from_step is not None and path.exists():
            # Records written after the checkpoint we resume from would be repeated: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(path, "a", buffering=1)

    def log(self, record: Dict[str, Any], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in record.items()}}) + "\n")

    def finish(self) -> None:
        self._fh.close()


class MultiLogger(Logger):
    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers: List[Logger] = list(loggers)

    def log(self, record: Dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(record, step)

    def summary(self, values: Dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
