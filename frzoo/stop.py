"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM alike.

SIGTERM is what Slurm, Kubernetes, systemd and torchrun send before they kill a job, so it gets
the treatment Ctrl-C gets. The first one asks for a graceful stop: the loop finishes the step in
progress (the distributed executor: the run of steps in progress, at most `train.log_every`
steps), writes a checkpoint, prints the resume command and exits with status 130. A second one
stops at once: one line naming the last checkpoint, status 130 (:class:`StoppedAtOnce`).

Who hears the signals:

- `frzoo run` with the local executor, and every process under torchrun (its agent sends each
  worker the signal it received, once): SIGINT and SIGTERM (:class:`StopRequest`); a process
  whose part does not decide when to stop ignores them, the stop reaches it through the
  pipeline.
- frzoo's own launcher (:func:`relayed`) relays the first signal as one SIGINT to rank 0, the
  process that feeds the pipeline; its workers ignore SIGTERM (:func:`relayed_only`), because a
  scheduler that signals every process of the job (systemd, Slurm) must not count as two
  signals on rank 0. A second signal to the launcher stops the job at once.
- Before the loop (imports, building the parts) there is nothing to finish: SIGTERM stops at
  once as Ctrl-C does (:func:`sigterm_as_ctrl_c`), except in a spawned rank 0, which keeps a
  relayed stop for its loop.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from . import rundir

SIGNALS: Tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
_listened: Tuple[signal.Signals, ...] = SIGNALS  # what StopRequest listens to in this process
_pending: Optional[str] = None  # a relayed stop that arrived before the loop began


class StoppedAtOnce(KeyboardInterrupt):
    """A stop signal that ends the process without a checkpoint: a second one, or one that
    arrives before training began. Its text is what the user reads (see :func:`explained`)."""


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequest:
    """Ctrl-C or SIGTERM sets a flag; the loop finishes the current step, checkpoints and stops.
    A second one raises :class:`StoppedAtOnce`.

    Where the process does not decide when to stop (a distributed worker that does not feed the
    first part) both are ignored: the stop reaches it through the pipeline instead.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self.enabled = enabled
        self._previous: Dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopRequest":
        global _pending
        handler = self._handle if self.enabled else signal.SIG_IGN
        try:
            for signum in _listened:
                self._previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        if self.enabled and _pending is not None:  # relayed before the loop began
            self.requested, _pending = True, None
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:  # the second one: stop now
            raise StoppedAtOnce(f"stopped at once by a second {_name(signum)}")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def sigterm_as_ctrl_c() -> None:
    """SIGTERM outside the training loop stops the process as Ctrl-C does (a
    :class:`StoppedAtOnce`, reported in one line), instead of ending it without a word."""
    signal.signal(signal.SIGTERM, _stop_at_once)


def _stop_at_once(signum: int, _frame: Any) -> None:
    raise StoppedAtOnce(f"stopped by {_name(signum)} while no training step was running")


def relayed_only(decides: bool) -> None:
    """In a worker that frzoo's launcher spawned: SIGTERM is ignored (the launcher hears it and
    relays it), and on rank 0 (`decides`) a relayed SIGINT that comes before the loop is kept
    for it, so a stop asked during start-up still ends in a checkpoint."""
    global _listened
    _listened = (signal.SIGINT,)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, _keep if decides else signal.SIG_IGN)


def _keep(signum: int, _frame: Any) -> None:
    global _pending
    _pending = _name(signum)


@contextlib.contextmanager
def relayed(relay: Callable[[], None]) -> Iterator[None]:
    """In frzoo's launcher, while its workers run: the first SIGINT or SIGTERM calls `relay`
    (which asks rank 0 to stop); a second raises :class:`StoppedAtOnce` here, and the
    launcher's cleanup then kills the workers."""
    heard = []

    def handle(signum: int, _frame: Any) -> None:
        if heard:
            raise StoppedAtOnce(f"stopped at once by a second {_name(signum)}")
        heard.append(signum)
        relay()

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def explained(out_dir: Path) -> Iterator[None]:
    """Around a run: a stop that did not wait for a checkpoint (:class:`StoppedAtOnce`, or a
    plain KeyboardInterrupt) becomes one line naming the last checkpoint that survives."""
    try:
        yield
    except KeyboardInterrupt as exc:
        what = str(exc) if isinstance(exc, StoppedAtOnce) else "interrupted"
        raise StoppedAtOnce(f"{what}; the steps since the last checkpoint are lost. "
                            f"{_survivor(out_dir)}.") from None


def _survivor(out_dir: Path) -> str:
    try:
        return rundir.last_good_checkpoint(out_dir)
    except Exception:  # noqa: BLE001 - a half-readable folder must not hide the stop
        return f"See {rundir.checkpoint_path(out_dir)}"
