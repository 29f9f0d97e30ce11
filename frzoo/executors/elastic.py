"""Joining the run folder under torchrun: its lock, and resuming by itself after a restart.

`torchrun --max-restarts N` restarts every worker of a job when one fails (a SIGKILL, a lost
node). The restarted workers run the same command line, so without help a fresh `frzoo run`
would find its own checkpoint and refuse the folder ("already holds a run"). The rule here:

    a start resumes from the run folder's checkpoint by itself when
      (1) torchrun says this is a restart: TORCHELASTIC_RESTART_COUNT > 0 on any rank (each
          node's agent counts its own restarts, so the ranks take the maximum), and
      (2) the folder's checkpoint was written by this same job: the folder's job record
          (rundir.job_record_path) names one of this job's torchrun agents.

(2) is what keeps a restart from adopting another job's run: a first attempt refused because
the folder held an older run would otherwise, once torchrun retried it, resume that run. The
agents (one torchrun process per node, alive across the restarts of its workers, each a
worker's parent) identify a job; a different job has different agents. Every other start is
decided as without torchrun: a fresh start on a folder with a checkpoint is refused, `--resume`
resumes, and a restart before the first checkpoint starts afresh.

The lock: the rank that writes the run folder takes it (`rundir.claim`: created, checked,
locked) for its whole run, so one job at a time writes a folder, under torchrun as under frzoo's
own launcher. A flock dies with its holder, and torchrun stops every old worker before the
restarted ones rendezvous, so a restart is never refused by its own earlier lock.

The leader (the rank writing the folder) decides and checks; the others receive the decision or
the error through a collective, so every rank of a refused job exits with the same one-line
message instead of waiting for a peer that gave up.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch.distributed as dist

from .. import rundir
from ..errors import FrzooError
from ..messages import log


def restart_count() -> int:
    """This node's restarts so far, as torchrun tells its workers (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> Optional[int]:
    """`torchrun --max-restarts`, or None when the launcher did not say."""
    value = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    return int(value) if value else None


# pytorch/pytorch#135712: with the c10d rendezvous, torchrun (2.4 and later) lends its own store to
# the workers and keeps it across restarts, so restarted workers read the addresses the killed
# ones published and never connect. torch's own switch turns the sharing off.
SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def _store_shared_across_restarts() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_warning() -> Optional[str]:
    """Said at start when torchrun may restart the job but a restart could not connect."""
    if not (max_restarts() or 0) > 0 or not _store_shared_across_restarts():
        return None
    return (f"torchrun --max-restarts {max_restarts()} lends its rendezvous store to the workers, "
            f"and a restarted group cannot connect through it (pytorch/pytorch#135712); for "
            f"restarts to work, start torchrun with {SHARED_STORE_FIX} in its environment.")


def explain_init_failure(exc: BaseException) -> BaseException:
    """A restarted group that could not connect: say why and how to avoid it."""
    if restart_count() == 0 or not _store_shared_across_restarts():
        return exc
    return FrzooError(f"the restarted group could not connect ({str(exc).strip()[:160]}): "
                      f"torchrun shared its rendezvous store with the workers, where the killed "
                      f"workers' addresses remain (pytorch/pytorch#135712). Start torchrun with "
                      f"{SHARED_STORE_FIX} in its environment; resume this run with "
                      f"`frzoo run --resume RUN_DIR`.")


def agent_id() -> str:
    """This process's torchrun agent: host, pid and start time of the parent process (the start
    time tells a reused pid apart). Stable across restarts; differs between jobs."""
    parent = os.getppid()
    try:
        # field 22 of /proc/PID/stat (after the parenthesised command name): start time in ticks
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{parent}:{started}"


@dataclass
class _Member:
    agent: str  # agent_id()
    restarts: int  # restart_count()


def _object_group() -> Any:
    """The group for the object collectives here: gloo. On NCCL they would need each rank's
    device set, which happens later (when the part is built)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _written_by(out_dir: Path, agents: List[str]) -> bool:
    """Whether the folder's job record names one of these agents (the same torchrun job)."""
    try:
        record = json.loads(rundir.job_record_path(out_dir).read_text())
    except (OSError, ValueError):
        return False
    return bool(set(record.get("agents", [])) & set(agents))


def _write_record(out_dir: Path, agents: List[str]) -> None:
    path = rundir.job_record_path(out_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # rundir.remove_partial_files' form
    tmp.write_text(json.dumps({"agents": sorted(set(agents)),
                               "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}) + "\n")
    os.replace(tmp, path)


def _decide(out_dir: Path, resume: bool, members: List[_Member]) -> bool:
    """The leader's decision: resume or not (see the module docstring), the folder checked
    (it is taken next: rundir.claim)."""
    restarts = max(m.restarts for m in members)
    checkpoint = rundir.checkpoint_path(out_dir)
    agents = [m.agent for m in members]
    if not resume and restarts > 0 and checkpoint.exists() and _written_by(out_dir, agents):
        step = rundir.saved_step(checkpoint)
        log.info(f"torchrun restart {restarts}: resuming from {checkpoint} (step {step})")
        resume = True
    rundir.check(out_dir, resume)
    return resume


@contextlib.contextmanager
def join_run_folder(out_dir: Path, resume: bool, *, leader: int) -> Iterator[Tuple[bool, Path]]:
    """Collective (every rank calls it, the process group up): check the run folder, hold its
    lock on the leader while the block runs, and yield whether this start resumes and the run
    folder, the leader's for every rank (without run.out_dir each process names its own
    `runs/<recipe>-<time>`, and their clocks may fall in different seconds)."""
    group = _object_group()
    members: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(members, _Member(agent_id(), restart_count()), group=group)
    decision: List[Dict[str, Any]] = [{}]
    with contextlib.ExitStack() as stack:
        if dist.get_rank() == leader:
            warning = restart_warning()
            if warning:
                log.warning(f"warning: {warning}")
            try:
                resume = _decide(out_dir, resume, members)
                stack.enter_context(rundir.claim(out_dir, resume))
                _write_record(out_dir, [m.agent for m in members])
                decision = [{"resume": resume, "out_dir": str(out_dir)}]
            except FrzooError as exc:
                decision = [{"error": str(exc)}]
        dist.broadcast_object_list(decision, src=leader, group=group)
        if "error" in decision[0]:
            raise FrzooError(decision[0]["error"])
        yield bool(decision[0]["resume"]), Path(decision[0]["out_dir"])


def share_from(src: int, compute: Callable[[], Any]) -> Any:
    """Collective (every rank calls it, the process group up): `compute()` run on rank `src`
    only, its result (or its FrzooError, raised on every rank) given to every rank."""
    answer: List[Dict[str, Any]] = [{}]
    if dist.get_rank() == src:
        try:
            answer = [{"value": compute()}]
        except FrzooError as exc:
            answer = [{"error": str(exc)}]
    dist.broadcast_object_list(answer, src=src, group=_object_group())
    if "error" in answer[0]:
        raise FrzooError(answer[0]["error"])
    return answer[0]["value"]


def restart_hint() -> str:
    """What happens next after a failure, as far as this node's torchrun agent knows."""
    limit = max_restarts()
    if limit is None:
        return ""
    left = limit - restart_count()
    if left > 0:
        return (f" torchrun restarts the job ({left} of --max-restarts {limit} left on this "
                f"node) and frzoo resumes from that checkpoint by itself.")
    return f" No torchrun restarts are left (--max-restarts {limit}), so the job stops here."
