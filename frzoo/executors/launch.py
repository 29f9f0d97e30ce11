"""Start, supervise and stop the processes of a distributed job: started here or under torchrun.

`frzoo run` with `executor: distributed` starts one process per part (:func:`launch`: each a
fork of a server that has imported torch, timm and frzoo once, frzoo.executors.fork_server),
forwards Ctrl-C to the process feeding the pipeline, and turns the first failure into one error
naming the part, its rank and host (the others are stopped: no process is left behind). Under
torchrun each process joins from the environment torchrun sets (:func:`torchrun_main`).

What each process runs is the `worker` function the caller passes (frzoo.run.worker): this module
knows processes, not what they train.
"""
from __future__ import annotations

import getpass
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .. import messages, rundir, stop
from ..config import check_master_addr
from ..errors import FrzooError
from . import elastic, fork_server
from .failures import Report, explain, shorten
from .topology import Layout
from .wire import PeerFailure, waited_for

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


def _watch_launcher() -> None:
    """Exit when the launcher dies (even by SIGKILL), so no worker is left behind. The launcher
    holds open the write end of a pipe this process reads (multiprocessing's parent sentinel):
    it ends when the launcher does. Not the parent's pid: the fork server is the parent."""
    launcher = multiprocessing.parent_process()
    if launcher is None:  # not started by multiprocessing: nothing to watch
        return

    def watch() -> None:
        launcher.join()
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="frzoo-launcher-watch").start()


def _spawned_worker(worker: Worker, rank: int, world_size: int, cfg_dict: Dict[str, Any],
                    out_dir: str, resume: bool, port: int, env: Dict[str, str], errors: Any,
                    show_messages: bool = False) -> None:
    """Entry of a process started by :func:`launch` (forked from the fork server). `env`: the
    launcher's environment for this job. `show_messages`: the launcher's command line shows
    frzoo's messages on stderr; so does this process (frzoo.messages)."""
    fork_server.adopt_environment(env)
    os.setpgrp()  # Ctrl-C in the terminal reaches the launcher only; it forwards it to rank 0
    stop.relayed_only(decides=rank == 0)  # a SIGTERM to every process counts once: relayed
    if show_messages:
        messages.show_on_stderr()
    _watch_launcher()
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
        errors.put(Report(rank, socket.gethostname(), user, detail, waited_for(exc)))
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
    """Run `worker` in one process per part: here (forked from this process's fork server,
    frzoo.executors.fork_server) or, under torchrun, as this process's rank. Returns the run's
    summary."""
    if under_torchrun():
        return torchrun_main(cfg, out_dir, resume=resume, num_parts=num_parts, worker=worker)
    check_master_addr(cfg.distributed.master_addr)  # named here, not blamed on the port
    world = num_parts * cfg.distributed.replicas  # replica-major: rank = replica * K + part
    port = free_port(cfg.distributed.master_addr, cfg.distributed.master_port)
    ctx = fork_server.context(worker.__module__)
    errors = ctx.SimpleQueue()
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)  # the plan's resolved recipe
    with rundir.claim(out_dir, resume), tempfile.TemporaryDirectory(
            prefix="frzoo-workers-", ignore_cleanup_errors=True) as scratch:
        env = _job_environment(scratch)
        procs = [ctx.Process(target=_spawned_worker, name=f"frzoo-part{r % num_parts + 1}"
                             + (f"-replica{r // num_parts}" if world > num_parts else ""),
                             args=(worker, r, world, cfg_dict, str(out_dir), resume, port, env,
                                   errors, messages.shown_on_stderr()))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        try:  # Ctrl-C or SIGTERM: rank 0 stops the job with a checkpoint; a second: at once
            with stop.relayed(lambda: _forward_sigint(procs[0])):
                failure = _supervise(procs, errors, cfg.distributed.timeout_s, num_parts)
        finally:
            _terminate(procs)
    if failure:
        raise failure
    return json.loads((out_dir / "summary.json").read_text())


def _forward_sigint(proc: Any) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGINT)


#: After the first failure, how long the other workers get to exit by themselves (seconds).
FAILURE_GRACE_S = 5.0


def _supervise(procs: List[Any], errors: Any, timeout_s: float,
               num_parts: int = 0) -> Optional[BaseException]:
    """Wait for every worker; on the first failure stop the others and explain it
    (frzoo.executors.failures: the exit codes are recorded before anything is stopped)."""
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return None
        if any(c not in (None, 0) for c in codes):
            # The others exit within moments by themselves (their neighbours are gone) and
            # report why; waiting for that, rather than stopping them at the first report, lets
            # the leader finish a checkpoint that every part has already handed to it.
            deadline = time.time() + FAILURE_GRACE_S
            while time.time() < deadline and any(p.is_alive() for p in procs):
                time.sleep(0.05)
            reports = _drain(errors)
            # A part that others waited for and that is still running after that is the stuck one.
            stuck = ([r for r, p in enumerate(procs) if p.is_alive()]
                     if any(report.waited_for is not None for report in reports) else [])
            codes = [p.exitcode for p in procs]  # before _terminate adds its own SIGTERMs
            _terminate(procs)
            reports += _drain(errors)
            return explain(codes, reports, stuck, timeout_s, _namer(num_parts or len(procs),
                                                                    len(procs)))
        time.sleep(0.1)


def _drain(errors: Any) -> List[Report]:
    reports = []
    while not errors.empty():
        reports.append(Report(*errors.get()))
    return reports


def _namer(num_parts: int, world: int) -> Callable[[int], str]:
    """rank -> `part k (rank n)`, or `part k of replica r (rank n)` in a replicated job."""
    return lambda rank: Layout(rank, num_parts, world // num_parts).name()


def _job_environment(scratch: str) -> Dict[str, str]:
    """The environment of a job's workers: this process's now, with `scratch` as their temporary
    folder (TMPDIR), which the launcher removes when the job ends: a worker ends with os._exit,
    which skips the clean-up of what it made there. torch.compile's cache stays where it was,
    shared between runs."""
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return {**os.environ, "TMPDIR": scratch, "TORCHINDUCTOR_CACHE_DIR": inductor}


def _terminate(procs: List[Any]) -> None:
    for proc in procs:  # SIGKILL: a worker ignores SIGTERM (the launcher relays it), and
        if proc.is_alive():  # a stopped job has nothing left to save
            proc.kill()
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
                raise lost_neighbour(exc, Layout(rank, num_parts, replicas),
                                        out_dir) from exc
            dist.barrier()
    finally:
        dist.destroy_process_group()
    summary = out_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def lost_neighbour(exc: BaseException, layout: Layout, out_dir: Path) -> BaseException:
    """Under torchrun no frzoo launcher explains a failure: a part that lost its neighbour (a
    worker killed, a node gone) says so in one line, with the checkpoint that survives and what
    torchrun does next. Any other error is kept as it is."""
    if waited_for(exc) is None:
        return exc
    cause = str(exc) if isinstance(exc, PeerFailure) else f"{type(exc).__name__}: {exc}"
    return FrzooError(f"{layout.name()[:-1]}, host {socket.gethostname()}) lost a "
                      f"neighbour: another process of this job stopped ({shorten(cause)}). "
                      f"{rundir.last_good_checkpoint(out_dir)}.{elastic.restart_hint()}")
