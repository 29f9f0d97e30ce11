"""Where the workers of frzoo's launcher start from: one fork server per launching process that
has imported, once, what every worker imports anyway.

Why: a worker started with multiprocessing's 'spawn' method is a fresh interpreter that imports
torch, torchvision, timm and frzoo again (2-3 CPU-seconds each, before any work); a test suite
starts about 150 of them. With the 'forkserver' method one server process imports them when the
first job of a process starts, and each worker of this and every later job is a fork of it (a
sweep or a test session reuses it; it waits, idle, as long as the launching process lives).

What a forked worker would otherwise take from the server rather than from its launcher, it is
given explicitly:

- the environment: the server's is the launcher's when the server started, not at this job's
  launch; the worker replaces it by the launcher's (:func:`adopt_environment`), and finds its
  temporary folder again from it (`tempfile.tempdir` reset);
- the launcher's liveness: the server is the worker's parent, not the launcher; the worker
  watches multiprocessing's parent sentinel, a pipe the launcher holds open (launch.py).

The server
- never initialises CUDA: importing torch and timm does not, and it runs nothing but forks, so a
  worker may use CUDA and NCCL (a process forked after CUDA is initialised cannot);
- imports from the launcher's `sys.path` (a checkout that shadows an installed frzoo is the code
  that runs, as it would be in a spawned worker);
- keeps its own temporary files (W&B makes two folders when timm imports it) in a folder of its
  own in the launching process's temporary folder as it was when frzoo was imported, never in a
  job's scratch folder, and removes it when it exits;
- ignores SIGINT and SIGTERM: a scheduler that signals every process of a job (systemd, Slurm)
  must not end it, because the launcher learns its workers' exit codes through it;
- exits when the launching process and every worker forked from it are gone, at once (it skips
  the interpreter's teardown).

Workers write to the stdout and stderr the launching process had when the server started (in a
command line, the same ones throughout). A worker started by torchrun does not come from here.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import shutil
import signal
import sys
import tempfile
from typing import Dict, Iterator, Mapping, Optional

import torch.multiprocessing

#: What the server imports besides the worker's own module: frzoo builds every model with timm,
#: which it imports lazily (frzoo.models), so the worker module alone does not import it.
PRELOAD = ("timm",)

#: Set in the server's environment only: this module, imported there first, then prepares the
#: server (:func:`_prepare_server`).
SERVER_MARK = "FRZOO_FORK_SERVER"

#: The server's temporary folder: this process's as found when frzoo was imported (importing
#: torch had already fixed it), not the one a caller or a job sets later.
SERVER_TMP = tempfile.gettempdir()


def _prepare_server() -> None:
    """In the server, before its other imports: ignore SIGTERM; keep every temporary file of the
    server in one folder of its own; at exit, remove that folder and end at once.

    Ending with os._exit skips the interpreter's teardown of torch and timm (a second or more on
    a busy machine): the server is gone within moments of its launcher and workers. The forked
    workers inherit the exit handler but never run it (they end with os._exit too), and it acts
    in the server's own process only."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    own = tempfile.mkdtemp(prefix="frzoo-fork-server-", dir=SERVER_TMP)
    os.environ["TMPDIR"] = tempfile.tempdir = own
    atexit.register(_exit_now, os.getpid(), own)


def _exit_now(server: int, own: str) -> None:
    if os.getpid() != server:
        return
    shutil.rmtree(own, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if os.environ.get(SERVER_MARK) == "1":  # this is the server's preload (see context())
    _prepare_server()


def context(worker_module: str) -> multiprocessing.context.BaseContext:
    """The 'forkserver' context the launcher starts its workers with; its server, started here
    on the first call in this process, has imported `worker_module` and :data:`PRELOAD`.

    A server that this process already runs is kept (multiprocessing holds one per process);
    one that another user of the forkserver method started without these imports still works,
    only each worker then imports them itself."""
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, worker_module, *PRELOAD])
    with _server_environment():
        multiprocessing.forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def _server_environment() -> Iterator[None]:
    """While the server starts: its environment (a process started from here inherits it), and
    the temporary folder in which multiprocessing makes this process's folder for the server's
    socket (:func:`_socket_base`)."""
    paths = [os.path.abspath(p) for p in sys.path]  # "" is the current folder, as in a spawn
    wanted = {"TMPDIR": SERVER_TMP, SERVER_MARK: "1", "PYTHONPATH": os.pathsep.join(paths)}
    saved: Dict[str, Optional[str]] = {key: os.environ.get(key) for key in wanted}
    saved_tempdir = tempfile.tempdir
    os.environ.update(wanted)
    tempfile.tempdir = _socket_base()
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: The longest path a Unix socket may have (sun_path: 108 bytes with the final NUL on Linux).
SOCKET_PATH_MAX = 107


def _socket_base() -> str:
    """Where multiprocessing makes the folder for the server's socket (BASE/pymp-XXXXXXXX/
    listener-XXXXXXXX): this process's temporary folder, or where that path would be too long for
    a Unix socket (a deep TMPDIR, as batch schedulers set), the system's, as later Python
    releases choose themselves (cpython#132124). multiprocessing keeps that folder for the
    process's lifetime and removes it at exit."""
    if len(SERVER_TMP) + len("/pymp-12345678/listener-12345678") <= SOCKET_PATH_MAX:
        return SERVER_TMP
    return next((d for d in ("/tmp", "/var/tmp", "/usr/tmp") if os.path.isdir(d)), SERVER_TMP)


def adopt_environment(env: Mapping[str, str]) -> None:
    """In a worker: the launcher's environment at launch replaces the one inherited from the
    server, and the temporary folder is found again from it (TMPDIR: the job's scratch folder)."""
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None
