"""Weights & Biases behind the :class:`frzoo.logging.Logger` interface.

One W&B run per training job. ``wandb`` is imported only when a recipe turns W&B on, so the rest
of frzoo (and every run with ``logging.wandb: false``) never pays its import or needs it installed.

Modes (``logging.mode``):

* ``auto``: ``WANDB_MODE`` from the environment when set; otherwise ``online`` when an API key is
  configured (``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``offline``.
* ``online``: log to the server. If it cannot be reached (or there is no key), the run falls back
  to ``offline`` and says so once: W&B never blocks or fails training.
* ``offline``: the run is written under ``<out_dir>/wandb/offline-run-*``; ``wandb sync`` uploads it.
* ``disabled``: no W&B run at all (the same as ``logging.wandb: false``).

Metric names: the records are frzoo.metrics' own, already in W&B's names (``train/loss``,
``part2/forward_s``, ``test/acc1``, ``epoch`` ...); they are logged as they are, at frzoo's step.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from .. import metrics
from ..errors import FrzooError
from .base import Logger

INSTALL_HINT = ("W&B logging needs the `wandb` package: `pip install wandb` (or set "
                "logging.wandb=false).")
DEFAULT_HOST = "https://api.wandb.ai"
RUN_ID_FILE = "wandb-run.json"  # in the run folder: lets a resumed run continue the same W&B run
PROBE_TIMEOUT_S = 3.0  # an unreachable server costs this, not W&B's 90 s init timeout
INIT_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 10.0  # how long finish() waits for W&B to flush an offline run file

Echo = Callable[[str], None]


def import_wandb() -> Any:
    """`import wandb`, or a FrzooError with the install hint (asked for, so not silently skipped)."""
    try:
        import wandb  # noqa: PLC0415  (lazy on purpose)
    except ImportError as exc:
        raise FrzooError(f"{INSTALL_HINT} ({exc})") from None
    return wandb


# ---------------------------------------------------------------- modes
def api_key_configured() -> bool:
    """Whether W&B would find an API key, without importing wandb or touching the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or ""
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> Tuple[str, str]:
    """(online | offline | disabled, why). `auto` follows WANDB_MODE, then whether a key exists."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("online", "offline", "disabled", "dryrun"):
            return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
        if api_key_configured():
            return "online", "an API key is configured"
        return "offline", "no W&B API key is configured"
    if mode == "online" and not api_key_configured():
        return "offline", "logging.mode is online but no W&B API key is configured"
    return mode, f"logging.mode={mode}"


def server_reachable(timeout: float = PROBE_TIMEOUT_S) -> Tuple[bool, str]:
    """A TCP connect to the W&B host, so an unreachable server costs seconds, not W&B's timeout.

    Behind an HTTP(S) proxy a direct connect proves nothing, so the probe is skipped there and
    W&B's own (shortened) init timeout decides.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True, "proxy configured"
    url = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST))
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port} is unreachable ({exc.strerror or exc})"


# ---------------------------------------------------------------- the logger
class WandbLogger(Logger):
    """One W&B run for one training job; every W&B failure degrades to a note, never an exception.

    The run starts in :meth:`start`, which the trainer calls once it knows the partition, so the
    run's config is the resolved recipe plus the resolved partition.
    """

    def __init__(self, *, out_dir: Path, project: str = "frzoo", entity: Optional[str] = None,
                 group: Optional[str] = None, name: Optional[str] = None,
                 tags: Optional[List[str]] = None, mode: str = "auto", log_model: bool = False,
                 resume: bool = False, echo: Optional[Echo] = None) -> None:
        self.wandb = import_wandb()  # fail before training starts, with the install hint
        self.out_dir = Path(out_dir)
        self.project, self.entity, self.group, self.name = project, entity, group, name
        self.tags = list(tags or [])
        self.requested_mode = mode
        self.log_model = log_model
        self.resume = resume
        self.echo: Echo = echo or (lambda msg: None)
        self.run: Any = None
        self.mode: Optional[str] = None  # the mode the run actually got
        self.partition: List[Dict[str, Any]] = []
        self._broken = False  # a W&B call failed: stop calling W&B, keep training
        self._finished = False

    @classmethod
    def from_config(cls, cfg_logging: Any, *, out_dir: Path, resume: bool = False,
                    echo: Optional[Echo] = None) -> "WandbLogger":
        return cls(out_dir=out_dir, project=cfg_logging.project, entity=cfg_logging.entity,
                   group=cfg_logging.group, name=cfg_logging.name, tags=list(cfg_logging.tags),
                   mode=cfg_logging.mode, log_model=bool(cfg_logging.get("log_model", False)),
                   resume=resume, echo=echo)

    # -- Logger interface
    def start(self, config: Dict[str, Any]) -> None:
        """Open the run: config = resolved recipe + partition; log the partition table once."""
        recipe = dict(config.get("recipe") or {})
        self.partition = list(config.get("partition") or [])
        run_config = {**recipe,
                      "partition": [row["modules"] for row in self.partition],
                      "num_parts": len(self.partition)}
        if not self._open(run_config):
            return
        first_step = int(config.get("step", 0) or 0)
        self._call(self._log_partition, first_step)

    def log(self, record: Dict[str, Any], step: int) -> None:
        if self.run is not None:
            self._call(self.run.log, metrics.values(record), step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is None:
            return
        clean = {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}
        self._call(self.run.summary.update, clean)
        final = self.out_dir / "final.pt"
        if self.log_model and final.is_file():
            self._call(self._log_model, final)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent: the trainer closes it, and so may a caller after an error)."""
        if self._finished:
            return
        self._finished = True
        if self.run is None:
            return
        run_file = Path(self.run.dir).parent / f"run-{self.run.id}.wandb"
        try:  # even after a failed call: an unfinished run would be closed only at exit
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001  W&B must not stop training
            if not self._broken:
                self._fail(f"W&B: finishing the run failed ({type(exc).__name__}: {exc})")
            return
        if self.mode == "offline" and not wait_until_written(run_file):
            self.echo(f"W&B: {run_file} was not complete {WRITE_TIMEOUT_S:.0f} s after the run "
                      f"finished; W&B's service is still writing it.")

    def abort(self) -> None:
        """Close the run as failed: training raised before the trainer could close it."""
        self.finish(exit_code=1)

    # -- internals
    def _open(self, run_config: Dict[str, Any]) -> bool:
        mode, why = resolve_mode(self.requested_mode)
        wanted_online = self.requested_mode == "online" or mode == "online"
        if mode == "disabled":
            self._broken = True
            return False
        if mode == "online":
            ok, reason = server_reachable()
            if not ok:
                mode, why = "offline", f"the W&B server is unreachable: {reason}"
        run_id = self._previous_id()
        try:
            self.run = self._init(mode, run_config, run_id)
        except Exception as exc:  # noqa: BLE001  W&B must not stop training
            if mode != "online":
                self._fail(f"W&B: could not start a run ({type(exc).__name__}: {exc})")
                return False
            mode, why = "offline", f"starting the online run failed ({type(exc).__name__}: {exc})"
            try:
                self.run = self._init(mode, run_config, run_id)
            except Exception as exc2:  # noqa: BLE001
                self._fail(f"W&B: could not start a run ({type(exc2).__name__}: {exc2})")
                return False
        self.mode = mode
        (self.out_dir / RUN_ID_FILE).write_text(json.dumps(
            {"id": self.run.id, "project": self.project, "entity": self.entity,
             "mode": mode}) + "\n")
        if mode == "online":
            self.echo(f"W&B: logging online to {getattr(self.run, 'url', None) or self.project}")
            return True
        run_dir = Path(self.run.dir).parent
        if wanted_online:  # say once why the run is not where the user expects it
            self.echo(f"W&B: {why}; logging offline instead, into {run_dir}. Upload it later "
                      f"with `wandb sync {run_dir}`.")
        else:
            self.echo(f"W&B: offline run ({why}) in {run_dir}; upload it later with "
                      f"`wandb sync {run_dir}`.")
        return True

    def _init(self, mode: str, run_config: Dict[str, Any], run_id: Optional[str]) -> Any:
        wandb = self.wandb
        settings = wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S)
        kwargs: Dict[str, Any] = dict(
            project=self.project, entity=self.entity, group=self.group, name=self.name,
            tags=self.tags or None, config=run_config, dir=str(self.out_dir), mode=mode,
            settings=settings, reinit="create_new")  # never end a run the user's code holds
        if run_id and not os.environ.get("WANDB_RUN_ID"):  # a W&B agent picks the id itself
            kwargs.update(id=run_id, resume="allow")
        return wandb.init(**kwargs)

    def _previous_id(self) -> Optional[str]:
        path = self.out_dir / RUN_ID_FILE
        if not self.resume or not path.is_file():
            return None
        try:
            return json.loads(path.read_text()).get("id")
        except (OSError, ValueError):
            return None

    def _log_partition(self, step: int) -> None:
        if not self.partition:
            return
        wandb = self.wandb
        columns = ["part", "first_module", "last_module", "num_modules", "params",
                   "output_shape", "device", "history", "staleness"]
        rows = [[row["part"], row["modules"][0], row["modules"][-1], len(row["modules"]),
                 row["params"], "x".join(map(str, row.get("output_shape") or [])),
                 row["device"], row["history"], row["staleness"]] for row in self.partition]
        if not self.resume:  # a resumed run logged its table already; W&B drops older steps
            self.run.log({"partition": wandb.Table(columns=columns, data=rows)}, step=step)
        self.run.summary.update({f"part{row['part']}/{key}": row[key] for row in self.partition
                                 for key in ("staleness", "history", "params")})

    def _log_model(self, path: Path) -> None:
        artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model",
                                       metadata={"format": "state_dict in the model's own names"})
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  W&B must not stop training
            self._fail(f"W&B: a call failed ({type(exc).__name__}: {exc})")

    def _fail(self, message: str) -> None:
        self._broken = True
        self.echo(f"{message}; W&B logging is off for the rest of this run "
                  f"(metrics.jsonl is complete).")


# ---------------------------------------------------------------- offline run files
_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_FILE_IDENT = b":W&B"


def run_file_records(path: Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of a `.wandb` file, as far as it is written.

    W&B 0.31 ships no reader for its run files: they are a LevelDB-framed log (32 KiB blocks of
    fragments FULL/FIRST/MIDDLE/LAST after a 7-byte header) of Record protobufs.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415
    data = Path(path).read_bytes()
    if data[:4] != _FILE_IDENT:
        raise FrzooError(f"'{path}' is not a W&B run file: it does not start with ':W&B'.")
    pos, pending = 7, b""  # the file header (':W&B', magic, version) fills the first 7 bytes
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if pos + _HEADER + length > len(data):
            break  # a record still being written
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zeros: the writer stopped here (crash or still open)
            break
        if kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending + payload if kind == _LAST else payload)
            pending = b""
            yield record


def run_file_complete(path: Path) -> bool:
    """Whether a `.wandb` file holds its exit record, i.e. the run was finished and flushed."""
    try:
        return any(record.WhichOneof("record_type") == "exit"
                   for record in run_file_records(path))
    except (OSError, FrzooError):
        return False


def wait_until_written(path: Path, timeout: float = WRITE_TIMEOUT_S) -> bool:
    """Wait for W&B's service to flush an offline run file.

    `run.finish()` returns once the service has handled the exit; the service closes (flushes)
    the file a moment later, on its own time. Waiting here means that when frzoo says a run is
    done, its offline run is complete on disk: ready for `wandb sync` or a reader.
    """
    deadline = time.monotonic() + timeout
    while True:
        if run_file_complete(path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
