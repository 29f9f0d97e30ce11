"""Where metrics go. A small interface; the trainer does not know which loggers are behind it.

Every logger gets the same records (frzoo.metrics: built once, in their final names) and writes
them as they are. ``metrics.jsonl`` in the run folder is always written: it is the run's own
record, readable without any service. Experiment trackers (W&B: frzoo.logging.wandb) are further
loggers behind the same interface.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .base import JsonlLogger, Logger, MultiLogger, NullLogger

__all__ = ["Logger", "NullLogger", "JsonlLogger", "MultiLogger", "build_loggers", "close_loggers",
           "read_jsonl"]


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
