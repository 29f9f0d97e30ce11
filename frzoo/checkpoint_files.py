"""A checkpoint on disk: a torch.distributed.checkpoint (DCP) folder, written by every process in
parallel, published by one rename, read back key by key without running code from the files.

    RUN_DIR/checkpoints/step-00000120-7/    a complete checkpoint: step 120, the run's 7th save
        .metadata                           DCP's index: every key, its shape, dtype and file
        __0_0.distcp, __1_0.distcp, ...     one file per process: its own part's entries
    RUN_DIR/checkpoints/.save-000007.tmp/   a save in progress (or killed): never read

Every process writes its own part's entries (frzoo.executors.part_state names them) into the
save's temporary folder with DCP, at the same time, nothing gathered to one process; DCP's
coordinator writes `.metadata` last, once every process has written its file, and then the
publisher (rank 0, or the one process of a local run) renames the folder to `step-N` and deletes
the older checkpoints. So a checkpoint is complete or absent: a kill, a full disk, a lost rank in
the middle of a save leaves the previous `step-N` as it was, and the temporary folder, which the
next start removes (:func:`partial_saves` says a resume that it happened).

Every entry is a tensor. What is not (the recipe, the progress, an algorithm's step numbers)
travels as JSON in a uint8 tensor (:func:`encode_json`), because DCP stores other objects as
pickles and unpickles them on load; and `.metadata`, a pickle of DCP's own classes, is read by
an unpickler that admits only those (:class:`SafeReader`).

`train.checkpoint_async: true` saves with DCP's `async_save`: the entries are copied to CPU
memory at once and written by a background thread while training goes on; the next save (and
the end of the run) first waits for the previous one, so at most one save is ever in flight.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .errors import FrzooError

FORMAT_VERSION = 2
META_KEY = "meta"
_PUBLISHED = re.compile(r"^step-(\d+)-(\d+)$")
_PARTIAL = re.compile(r"^\.save-(\d+)\.tmp$")


# ---------------------------------------------------------------- where checkpoints are
def published(folder: Path) -> List[Path]:
    """The complete checkpoints in `folder` (RUN_DIR/checkpoints), oldest first (by save)."""
    found = []
    for path in folder.glob("step-*") if folder.is_dir() else []:
        match = _PUBLISHED.match(path.name)
        if match and (path / ".metadata").is_file():
            found.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(found)]


def partial_saves(folder: Path) -> List[Path]:
    """Temporary folders of saves that never completed (killed, or their disk full)."""
    return sorted(p for p in folder.glob(".save-*.tmp") if _PARTIAL.match(p.name)) \
        if folder.is_dir() else []


def partial_path(folder: Path, saves: int) -> Path:
    """The temporary folder of the run's `saves`-th save: the same name on every process."""
    return folder / f".save-{saves:06d}.tmp"


def published_path(folder: Path, step: int, saves: int) -> Path:
    """`step-N-S`: the step, and the save's number, which orders the checkpoints (a run saves
    twice at its last step, before and after its final evaluation) and is never reused."""
    return folder / f"step-{step:08d}-{saves}"


# ---------------------------------------------------------------- JSON in a tensor
def encode_json(value: Any) -> Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def decode_json(tensor: Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode())


# ---------------------------------------------------------------- reading
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` holds only DCP's own dataclasses, torch dtypes and sizes: anything else
    (code a crafted file would run) is refused."""

    ALLOWED = ("torch.distributed.checkpoint.", "collections")
    NAMES = {("torch.serialization", "_get_layout"), ("torch", "Size"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.ALLOWED) or (module, name) in self.NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP index")


class SafeReader(FileSystemReader):
    """DCP's file reader whose index is read without running code, and whose failures name the
    file that failed."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt index raises many types
            raise unreadable(path, exc) from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        by_file: Dict[str, List[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            try:
                super().read_data(type(plan)(items=items), planner).wait()
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data raises many types
                raise unreadable(Path(self.path) / name, exc) from None
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(None)
        return done


def unreadable(path: Path, exc: BaseException) -> FrzooError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return FrzooError(f"checkpoint file '{path}' is unreadable ({first}); it may be truncated "
                      f"or corrupted. Delete that checkpoint folder to resume from an earlier "
                      f"one, or start a new run.")


class DcpCheckpoint:
    """A published DCP checkpoint: its keys (shape and dtype) from the index, its entries read
    on request, by this process alone (no collective: any process may read any key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = SafeReader(str(path)).read_metadata().state_dict_metadata
        self.meta = decode_json(self.read_new([META_KEY])[META_KEY])
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT_VERSION:
            raise FrzooError(f"checkpoint '{path}' is not a frzoo checkpoint of format "
                             f"{FORMAT_VERSION}.")

    def keys(self, prefix: str = "") -> List[str]:
        return [k for k, v in self.index.items()
                if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)]

    def read_into(self, template: Dict[str, Tensor]) -> None:
        """Fill the tensors of `template` (key -> tensor of the saved shape) in place."""
        missing = [k for k in template if k not in self.index]
        if missing:
            raise FrzooError(f"checkpoint '{self.path}' lacks {len(missing)} entries this run "
                             f"needs (e.g. {missing[:3]}): it was written for another model.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            try:
                dcp.load(template, storage_reader=SafeReader(str(self.path)), no_dist=True)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP wraps the
                # reader's error in a CheckpointException, a BaseException
                raise cause_of(exc, FrzooError) or unreadable(self.path, exc) from None

    def read_new(self, keys: List[str]) -> Dict[str, Tensor]:
        """The entries `keys`, in new CPU tensors."""
        out = {}
        for key in keys:
            md = self.index.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise FrzooError(f"checkpoint '{self.path}' has no entry '{key}': it is not a "
                                 f"frzoo checkpoint of format {FORMAT_VERSION}.")
            out[key] = torch.empty(md.size, dtype=md.properties.dtype)
        self.read_into(out)
        return out


# ---------------------------------------------------------------- writing
class CheckpointWriter:
    """This process's end of the checkpoint saves: every process calls :meth:`save` at the same
    step with its own entries; `group` is the gloo group the processes coordinate on (None: one
    process, DCP's no-process-group path); the publisher renames the finished folder."""

    def __init__(self, folder: Path, group: Any, publisher: bool, asynchronous: bool) -> None:
        self.folder, self.group, self.publisher = folder, group, publisher
        self.asynchronous = asynchronous
        self.pending: Optional[Tuple[Future, Path, int, int]] = None

    def save(self, state: Dict[str, Tensor], step: int, saves: int) -> None:
        """Write `state` as the run's `saves`-th checkpoint (at `step`); asynchronously, return
        once it is copied to CPU memory. The previous save is waited for first."""
        self.wait()
        tmp = partial_path(self.folder, saves)
        self.folder.mkdir(parents=True, exist_ok=True)
        writer = FileSystemWriter(str(tmp), overwrite=True)
        kwargs: Dict[str, Any] = {"storage_writer": writer, "process_group": self.group,
                                  "no_dist": self.group is None}
        with warnings.catch_warnings(), self.failing(tmp):
            warnings.simplefilter("ignore")  # single-process and overwrite notes
            if self.asynchronous:
                future = dcp.async_save(state, **kwargs)
                self.pending = (future, tmp, step, saves)
                return
            dcp.save(state, **kwargs)
        self.publish(tmp, step, saves)

    def wait(self) -> None:
        """Wait for the save in flight, if any, and publish it."""
        if self.pending is None:
            return
        future, tmp, step, saves = self.pending
        self.pending = None
        with self.failing(tmp):
            future.result()
        self.publish(tmp, step, saves)

    def abandon(self) -> None:
        """After a failure: publish the save in flight if it completed, never wait for it (its
        peers may be gone)."""
        if self.pending is not None and self.pending[0].done() and \
                self.pending[0].exception() is None:
            self.wait()
        self.pending = None

    def publish(self, tmp: Path, step: int, saves: int) -> None:
        """The publisher: the finished folder becomes `step-N`, then the older ones go."""
        if not self.publisher:
            return
        final = published_path(self.folder, step, saves)
        os.replace(tmp, final)
        fsync_dir(self.folder)  # the rename survives a power cut
        for old in published(self.folder):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        legacy = self.folder / "last.pt"
        if legacy.exists():  # a format-1 checkpoint this run resumed from
            legacy.unlink()

    def failing(self, tmp: Path) -> Any:
        return _WriteFailure(self.folder, tmp, self.publisher)


class _WriteFailure:
    """A failed write (a full disk, a file size limit) as one line; the previous checkpoint is
    untouched, since only the temporary folder was written, which the publisher deletes (every
    process fails the save together: DCP hands each rank's failure to all)."""

    def __init__(self, folder: Path, tmp: Path, publisher: bool) -> None:
        self.folder, self.tmp, self.publisher = folder, tmp, publisher

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        cause = os_error(exc) if isinstance(exc, (Exception, CheckpointException)) else None
        if cause is None:
            return False
        if self.publisher:
            shutil.rmtree(self.tmp, ignore_errors=True)
        kept = published(self.folder)
        left = (f"the previous checkpoint {kept[-1]} is kept" if kept else
                "no earlier checkpoint exists")
        raise FrzooError(f"could not write checkpoint '{self.tmp}' "
                         f"({cause.strerror or cause}); {left}. Free space or choose a writable "
                         f"run.out_dir.") from None


def cause_of(exc: Optional[BaseException], kind: type) -> Any:
    """The exception of type `kind` behind `exc`: DCP collects each rank's failure
    (CheckpointException.failures), torch's writers chain them."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind a failed save; a file size limit is a RuntimeError of torch.save."""
    found = cause_of(exc, OSError)
    if found is None and exc is not None and ("File too large" in str(exc)
                                              or "file write failed" in str(exc)):
        found = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    return found


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial(folder: Path) -> None:
    """Delete the temporary folders of saves that never completed."""
    for path in partial_saves(folder):
        shutil.rmtree(path, ignore_errors=True)

