"""The run folder: its layout, its lock, and the files a killed write leaves behind.

Every writer of a run folder (the trainer, `frzoo eval`, `frzoo export`, the launcher of a
distributed run) finds its files through these helpers, so the layout is written down once:

    RUN_DIR/recipe.yaml  partition.json  metrics.jsonl  summary.json  final.pt
    RUN_DIR/trace.json   (with `train.trace`: the timeline, frzoo.timeline)
    RUN_DIR/checkpoints/step-00000120/  (the newest complete checkpoint: frzoo.checkpoint_files)
    RUN_DIR/checkpoints/last.pt         (a checkpoint of format 1, written before format 2)
    RUN_DIR/.lock        (held while a run writes into the folder)
    RUN_DIR/.torchrun-job  (under torchrun: the job writing the folder, for its restarts)
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint_files import DcpCheckpoint, published, remove_partial
from .errors import FrzooError
from .locks import folder_lock

# errno values that mean "the run folder cannot take more data", whichever write hit them
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def checkpoints_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def checkpoint_path(out_dir: Path) -> Path:
    """The newest complete checkpoint: a format-2 folder, else a format-1 `last.pt` (which may
    not exist: nothing was saved yet)."""
    found = published(checkpoints_dir(out_dir))
    return found[-1] if found else checkpoints_dir(out_dir) / "last.pt"


def saved_step(path: Path) -> int:
    """The step of the checkpoint at `path` (either format)."""
    if path.is_dir():
        return int(DcpCheckpoint(path).meta["progress"]["step"])
    return int(torch.load(path, map_location="cpu", weights_only=True,
                          mmap=True)["progress"]["step"])


def trace_path(out_dir: Path) -> Path:
    return out_dir / "trace.json"


def job_record_path(out_dir: Path) -> Path:
    """Which torchrun job writes the folder: a restart of that job resumes by itself
    (frzoo.executors.elastic)."""
    return out_dir / ".torchrun-job"


def lock(out_dir: Path) -> Any:
    """Refuse to let two runs write into one folder at the same time."""
    return folder_lock(out_dir, f"run folder '{out_dir}' is in use by another frzoo run "
                                f"(pid {{pid}}); choose another run.out_dir.")


def check(out_dir: Path, resume: bool) -> None:
    """Before anything is built or created: may this run write there? A fresh start needs a
    folder without a run, a resume one with a checkpoint, and the folder (or, where it does not
    exist yet, its nearest existing parent) must be writable. Creates nothing: a refused run
    leaves no folder behind."""
    if not resume and checkpoint_path(out_dir).exists():
        raise FrzooError(f"run.out_dir '{out_dir}' already holds a run; resume it with "
                         f"`frzoo run --resume {out_dir}` or set run.out_dir to a new folder.")
    if resume and not checkpoint_path(out_dir).exists():
        raise FrzooError(f"nothing to resume in '{out_dir}': {checkpoint_path(out_dir)} "
                         f"does not exist.")
    existing = next((p for p in (out_dir, *out_dir.absolute().parents) if p.exists()), None)
    why = None
    if existing is not None and not existing.is_dir():
        why = f"'{existing}' is not a directory"
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        why = f"permission denied in '{existing}'"
    if why:
        raise FrzooError(f"run.out_dir '{out_dir}' is not writable ({why}); choose another folder.")


def prepare(out_dir: Path, resume: bool) -> None:
    """Create the folder and check that this run may write there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise FrzooError(f"run.out_dir '{out_dir}' is not writable ({exc.strerror}); "
                         f"choose another folder.") from None
    check(out_dir, resume)


@contextlib.contextmanager
def claim(out_dir: Path, resume: bool) -> Iterator[None]:
    """Take the run folder: create it, check it and hold its lock while the block runs. The one
    place a run takes its folder: a local run, the launcher of a distributed one, and the rank
    that writes the folder under torchrun (frzoo.executors.elastic)."""
    prepare(out_dir, resume)
    with lock(out_dir):
        yield


def remove_partial_files(out_dir: Path) -> None:
    """Delete the temporary files of writes a killed run never finished (see atomic_save), and
    the folders of its unfinished checkpoint saves."""
    for folder in (out_dir, out_dir / "checkpoints"):
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
    remove_partial(checkpoints_dir(out_dir))


def last_good_checkpoint(out_dir: Path) -> str:
    """How an error tells the user what survives: the checkpoint and its step, or that none
    was written yet (then there is nothing to resume: start the run again)."""
    path = checkpoint_path(out_dir)
    if not path.exists():
        return "No checkpoint was written yet, so nothing is lost beyond this start"
    step = saved_step(path)
    return (f"The last good checkpoint is {path} (step {step}); resume with "
            f"`frzoo run --resume {out_dir}`")
