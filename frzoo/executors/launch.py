"""Start, supervise and stop the processes of a distributed job: spawned here or under torchrun.

`frzoo run` with `executor: distributed` spawns one process per part (:func:`launch`), forwards
Ctrl-C to the process feeding the pipeline, and turns the first failure into one error naming
the part, its rank and host (the others are stopped: no process is left behind). Under torchrun
each process joins from the environment torchrun sets (:func:`torchrun_main`).

What each process runs is the `worker` function the caller passes (frzoo.run.worker): this module
knows processes, not what they train.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .. import messages, rundir
from ..errors import FrzooError
from . import elastic
from .p2p import PeerStalled, _is_timeout
from .replicas import Layout

# worker(cfg, out_dir, resume, rank, world_size): one process's whole job
Worker = Callable[[DictConfig, Path, bool, int, int], None]


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def choose_backend(cfg: DictConfig) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    devices = list(cfg.devices or ["cpu"])
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def _threads(cfg: DictConfig, world_size: int) -> int:
    return cfg.train.threads or max(1, (os.cpu_count() or 1) // world_size)


def _init_group(cfg: DictConfig, rank: int, world_size: int) -> None:
    dist.init_process_group(choose_backend(cfg), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=cfg.distributed.timeout_s))


def _watch_parent(parent: int) -> None:
    """Exit when the launcher dies (even by SIGKILL), so no worker is left behind."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=watch, daemon=True, name="frzoo-parent-watch").start()


def _spawned_worker(worker: Worker, rank: int, world_size: int, cfg_dict: Dict[str, Any],
                    out_dir: str, resume: bool, port: int, parent: int, errors: Any,
                    show_messages: bool = False) -> None:
    """Entry of a process started by :func:`launch`. `show_messages`: the launcher's command
    line shows frzoo's messages on stderr; so does this process (frzoo.messages)."""
    os.setpgrp()  # Ctrl-C in the terminal reaches the launcher only; it forwards it to rank 0
    if show_messages:
        messages.show_on_stderr()
    _watch_parent(parent)
    os.environ.update(MASTER_ADDR=cfg_dict["distributed"]["master_addr"], MASTER_PORT=str(port))
    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(_threads(cfg, world_size))
    code = 0
    try:
        _init_group(cfg, rank, world_size)
        worker(cfg, Path(out_dir), resume, rank, world_size)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then exit non-zero
        user = isinstance(exc, FrzooError)
        detail = str(exc) if user else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        stalled = (-1 if exc.peer is None else exc.peer) if isinstance(exc, PeerStalled) \
            else (-1 if _is_timeout(exc) else None)  # the rank it waited for; -1: unknown
        errors.put((rank, socket.gethostname(), user, detail, stalled))
        code = 2 if user else 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a peer that already failed cannot hang us here


# ---------------------------------------------------------------- the launcher
def free_port(addr: str, port: int) -> int:
    """`port`, checked free, or (0) a free port chosen by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((addr, port))
        except OSError as exc:
            raise FrzooError(f"distributed.master_port={port} on {addr} cannot be used "
                             f"({exc.strerror}); set distributed.master_port=0 to pick a free "
                             f"port, or choose another.") from None
        return sock.getsockname()[1]


def launch(cfg: DictConfig, out_dir: Path, *, resume: bool, num_parts: int,
           worker: Worker) -> Dict[str, Any]:
    """Run `worker` in one process per part: here (spawning them) or, under torchrun, as this
    process's rank. Returns the run's summary."""
    if under_torchrun():
        return torchrun_main(cfg, out_dir, resume=resume, num_parts=num_parts, worker=worker)
    world = num_parts * cfg.distributed.replicas  # replica-major: rank = replica * K + part
    port = free_port(cfg.distributed.master_addr, cfg.distributed.master_port)
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)  # the plan's resolved recipe
    with rundir.claim(out_dir, resume):
        procs = [ctx.Process(target=_spawned_worker, name=f"frzoo-part{r % num_parts + 1}"
                             + (f"-replica{r // num_parts}" if world > num_parts else ""),
                             args=(worker, r, world, cfg_dict, str(out_dir), resume, port,
                                   os.getpid(), errors, messages.shown_on_stderr()))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        previous = signal.signal(signal.SIGINT, lambda *_: _forward_sigint(procs[0]))
        try:
            failure = _supervise(procs, errors, cfg.distributed.timeout_s, num_parts)
        finally:
            signal.signal(signal.SIGINT, previous)
            _terminate(procs)
    if failure:
        raise failure
    return json.loads((out_dir / "summary.json").read_text())


def _forward_sigint(proc: Any) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGINT)


def _supervise(procs: List[Any], errors: Any, timeout_s: float,
               num_parts: int = 0) -> Optional[BaseException]:
    """Wait for every worker; on the first failure stop the others and explain it."""
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return None
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            # give the others a moment to report their own errors, then stop them
            deadline = time.time() + 2.0
            while time.time() < deadline and any(p.is_alive() for p in procs) and errors.empty():
                time.sleep(0.05)
            reports = _drain(errors)
            stuck: List[int] = []
            if any(report[4] is not None for report in reports):
                # A part timed out waiting: the parts that merely waited exit within moments
                # (their peers are gone); a part still running after that is the stuck one.
                deadline = time.time() + 5.0
                while time.time() < deadline and sum(p.is_alive() for p in procs) > 1:
                    time.sleep(0.05)
                stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            _terminate(procs)
            reports += _drain(errors)
            return _explain(procs, failed, reports, stuck, timeout_s, num_parts)
        time.sleep(0.1)


def _drain(errors: Any) -> List[Tuple[int, str, bool, str, Optional[int]]]:
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    return reports


def _explain(procs: List[Any], failed: List[int],
             reports: List[Tuple[int, str, bool, str, Optional[int]]],
             stuck: Sequence[int] = (), timeout_s: float = 0.0,
             num_parts: int = 0) -> BaseException:
    """The error to raise: the first worker's own error, naming its part and rank."""
    who = _namer(num_parts or len(procs), len(procs))
    by_rank = {rank: (host, user, detail) for rank, host, user, detail, _ in reports}
    waited = {rank: peer for rank, _, _, _, peer in reports if peer is not None}
    if waited:
        # The stalled part: one that others waited for and that was not itself waiting; else the
        # one still running when the others had stopped.
        blamed = sorted({p for p in waited.values() if p >= 0 and p not in waited})
        culprit = blamed[0] if blamed else (stuck[0] if stuck else None)
        if culprit is not None and culprit not in by_rank and (culprit in stuck
                                                                or culprit not in failed):
            rank = min((r for r, peer in waited.items() if peer == culprit), default=min(waited))
            return FrzooError(
                f"{who(culprit)} stalled: {who(rank).split(' (')[0]} waited more than "
                f"{timeout_s:g} s (distributed.timeout_s) for it, so the job was stopped (no "
                f"process is left running). The last complete checkpoint is "
                f"kept; resume with `frzoo run --resume`. If the part is only slow, raise "
                f"distributed.timeout_s.")
    # The root cause is the report of a worker that did not just lose a peer.
    origin = next((r for r in sorted(by_rank) if by_rank[r][1] and r not in waited), None)
    if origin is None:
        origin = next((r for r in failed if r in by_rank and not _peer_loss(by_rank[r][2])
                       and r not in waited), failed[0])
    if origin in by_rank:
        host, user, detail = by_rank[origin]
        message = f"{who(origin)[:-1]}, host {host}) failed: {detail}"
        return FrzooError(message) if user else RuntimeError(message)
    code = procs[origin].exitcode
    how = (f"was killed by signal {signal.Signals(-code).name}" if code and code < 0
           else f"exited with status {code}")
    return RuntimeError(f"{who(origin)} {how}; the other parts were stopped. "
                        f"The last complete checkpoint is kept; resume with `frzoo run --resume`.")


def _namer(num_parts: int, world: int) -> Callable[[int], str]:
    """rank -> `part k (rank n)`, or `part k of replica r (rank n)` in a replicated job."""
    return lambda rank: Layout(rank, num_parts, world // num_parts).name()


def _peer_loss(detail: str) -> bool:
    return any(s in detail for s in ("Connection closed by peer", "Connection reset",
                                     "Timed out", "timed out", "Broken pipe"))


def _terminate(procs: List[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + 5.0
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join()


# ---------------------------------------------------------------- torchrun
def torchrun_main(cfg: DictConfig, out_dir: Path, *, resume: bool, num_parts: int,
                  worker: Worker) -> Dict[str, Any]:
    """Join a job started by torchrun (one or several nodes): RANK/WORLD_SIZE come from it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    replicas = cfg.distributed.replicas
    if world != num_parts * replicas:
        having = f"{num_parts} parts" + (f" x {replicas} replicas (distributed.replicas)"
                                         if replicas > 1 else "")
        raise FrzooError(f"torchrun started {world} processes (WORLD_SIZE) but the recipe has "
                         f"{having}; start one process per part and replica, "
                         f"{num_parts * replicas} in all (e.g. --nproc-per-node "
                         f"{num_parts * replicas} on one node).")
    torch.set_num_threads(_threads(cfg, world))
    try:
        _init_group(cfg, rank, world)
    except Exception as exc:  # noqa: BLE001 - a restart that cannot connect says why
        raise elastic.explain_init_failure(exc) from exc
    try:
        # the leader (the last part of replica 0) checks the folder and holds its lock; a
        # restart resumes
        with elastic.join_run_folder(out_dir, resume, leader=num_parts - 1) as (resume, out_dir):
            try:
                worker(cfg, out_dir, resume, rank, world)
            except Exception as exc:  # noqa: BLE001 - a lost peer becomes one clear line
                raise _torchrun_failure(exc, rank, out_dir) from exc
            dist.barrier()
    finally:
        dist.destroy_process_group()
    summary = out_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def _torchrun_failure(exc: BaseException, rank: int, out_dir: Path) -> BaseException:
    """Under torchrun no frzoo launcher explains a failure: a part that lost its neighbour (a
    worker killed, a node gone) says so in one line, with the checkpoint that survives and what
    torchrun does next. Any other error is kept as it is."""
    if isinstance(exc, FrzooError) and not isinstance(exc, PeerStalled):
        return exc
    if not (isinstance(exc, PeerStalled) or _is_timeout(exc) or _peer_loss(str(exc))):
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FrzooError(f"part {rank + 1} (rank {rank}, host {socket.gethostname()}) lost a "
                      f"neighbour: another process of this job stopped ({first[:200]}). "
                      f"{rundir.last_good_checkpoint(out_dir)}.{elastic.restart_hint()}")
