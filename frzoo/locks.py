"""One writer per folder (a run, a local sweep)."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FrzooError


@contextmanager
def folder_lock(folder: Path, busy_message: str) -> Iterator[None]:
    """Hold an exclusive flock on `<folder>/.lock` for the block, or raise FrzooError.

    The kernel drops a flock when its holder dies (even by SIGKILL), so a killed run never blocks
    its own resumption and no stale-pid guess is needed. `busy_message` may name `{pid}`.
    """
    lock = folder / ".lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FrzooError(busy_message.format(pid=pid)) from None
        try:  # the holder we raced with may have removed the file: lock the one at the path
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the unlock, so a waiter re-checks the path
        os.close(fd)
