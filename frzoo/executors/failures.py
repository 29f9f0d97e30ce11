"""Which process of a failed job to blame, and the one line that says so.

When one process of a job fails, its neighbours fail too: each one's wait on it ends with a
lost connection or a timeout (frzoo.executors.wire.PeerFailure), often within the launcher's
poll interval. So the first process seen to exit is not necessarily the cause. The launcher
(frzoo.executors.launch) records every process's exit code before it stops the others, and every
report the processes sent (:class:`Report`); :func:`blame` then picks the cause from those alone
(a pure function, unit-tested over recorded exit codes and reports), in this order:

1. a process that died without a report: killed by a signal (SIGKILL, the OOM killer, a crash),
   or exited non-zero without saying why; a signal first, then the lowest rank;
2. a process that reported an error of its own (not a lost or silent neighbour), a user error
   (FrzooError) first;
3. a process the others waited for that neither reported nor died: it is stuck (stalled);
4. otherwise the first report.
"""
from __future__ import annotations

import signal
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

from ..errors import FrzooError

RESUME = "The last complete checkpoint is kept; resume with `frzoo run --resume`."


class Report(NamedTuple):
    """What a failing worker tells the launcher before it exits."""
    rank: int
    host: str
    user: bool  # a FrzooError: its message is the whole story (no traceback)
    detail: str
    waited_for: Optional[int]  # a failed wait on that rank (-1: unknown); None: its own error


class WorkerDied(FrzooError, RuntimeError):
    """A worker was killed by a signal or exited without a report: one line, no traceback (a
    RuntimeError too, as any worker failure that is not the user's)."""


def blame(codes: Sequence[Optional[int]], reports: Sequence[Report],
          stuck: Sequence[int] = ()) -> Tuple[str, int]:
    """The cause of a failed job: ("died", rank), ("error", rank) or ("stalled", rank), from
    every rank's exit code (None: still running) taken before the launcher stopped anything,
    the reports, and the ranks still running once the others had stopped (`stuck`)."""
    by_rank = {r.rank: r for r in reports}
    dead = [rank for rank, code in enumerate(codes) if code not in (None, 0) and rank not in by_rank]
    if dead:
        return "died", min(dead, key=lambda rank: (codes[rank] >= 0, rank))  # type: ignore[operator]
    own = [r for r in reports if r.waited_for is None]
    if own:
        return "error", min(own, key=lambda r: (not r.user, r.rank)).rank
    waited = {r.rank: r.waited_for for r in reports}
    blamed = sorted({p for p in waited.values() if p is not None and p >= 0 and p not in waited})
    culprit = blamed[0] if blamed else (stuck[0] if stuck else None)
    if culprit is not None and culprit not in by_rank:
        return "stalled", culprit
    return "error", min(by_rank) if by_rank else 0


def explain(codes: Sequence[Optional[int]], reports: Sequence[Report], stuck: Sequence[int],
            timeout_s: float, name: Callable[[int], str]) -> BaseException:
    """The error the launcher raises for a failed job (`name`: rank -> `part k (rank n)`)."""
    kind, rank = blame(codes, reports, stuck)
    if kind == "stalled":
        waiters = [r.rank for r in reports if r.waited_for == rank] or [r.rank for r in reports]
        waiter = name(min(waiters)).split(" (")[0] if waiters else "another part"
        return FrzooError(
            f"{name(rank)} stalled: {waiter} waited more than {timeout_s:g} s "
            f"(distributed.timeout_s) for it, so the job was stopped (no process is left "
            f"running). {RESUME} If the part is only slow, raise distributed.timeout_s.")
    by_rank: Dict[int, Report] = {r.rank: r for r in reports}
    if kind == "error" and rank in by_rank:
        report = by_rank[rank]
        message = f"{name(rank)[:-1]}, host {report.host}) failed: {report.detail}"
        return FrzooError(message) if report.user else RuntimeError(message)
    code = codes[rank] if rank < len(codes) else None
    how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exited with status {code}")
    return WorkerDied(f"{name(rank)} {how}; the other parts were stopped. {RESUME}")


def shorten(text: str, limit: int = 200) -> str:
    """The first line of `text`, at most `limit` characters, cut at a word boundary."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return f"{cut} ..."
