"""One process per part on torch.distributed: the parts really run at the same time.

Rank k runs part k+1 with exactly the per-part step the local executor calls; only the transport
differs. Per iteration t, rank k:

    receive h_{k-1}^t from rank k-1 (rank 0 takes the batch and sends the labels to the last rank)
    forward (the play)                         -> send h_k^t to rank k+1 (asynchronously)
    receive the delta rank k+1 sent (FIFO)     -> backward and update -> send its delta to rank k-1

Sends are asynchronous, so rank k goes on with iteration t+1 as soon as its own iteration t is
done: after warm-up every rank is busy with its own forward, replay and backward, and the period
approaches the slowest part's work (shared/docs/ALGORITHM.md, "Ideal speed"). Every message
carries a small header (kind, shape), so a smaller last batch and the stop signal need no other
coordination. The last rank (which has the loss) is the leader: it logs and writes files.

`frzoo run` starts the K worker processes itself (:func:`launch`); under torchrun each process
joins from the environment torchrun sets (:func:`torchrun_main`).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..algorithms.base import PHASES, ForwardResult, PartAlgorithm
from ..errors import FrzooError
from .base import (Batch, EvalTotals, Executor, PhaseClock, eval_forward, load_part_state,
                   part_state, read_windows)

# Message kinds in a header, and the tags of the channels (gloo matches on tags; NCCL on the
# order of calls between two ranks, which the schedule keeps the same on both sides).
DATA, STOP, END = 0, 1, 2
ACT, DELTA, LABEL, EVAL_ACT, EVAL_LABEL, TIMING = 1, 2, 3, 4, 5, 6
MEMORY_KEYS = ("params_bytes", "optimizer_bytes", "peak_activation_bytes", "peak_allocated_bytes")
HEADER_LEN = 10  # kind, dtype, ndim, up to 7 dims
TRAINING, EVALUATION = 0, 1  # send channels (see DistributedExecutor._advance)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


class PeerStalled(FrzooError):
    """This process waited longer than distributed.timeout_s for another part."""

    def __init__(self, message: str, peer: Optional[int]) -> None:
        super().__init__(message)
        self.peer = peer  # the rank waited for; None where a collective does not say which


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text
                                              or "Timeout" in text or "timeout" in text)


class DistributedExecutor(Executor):
    """The transport for one part in its own process."""

    def __init__(self, algorithm: PartAlgorithm, rank: int, world_size: int, backend: str) -> None:
        self.algorithms = [algorithm]
        self.algo = algorithm
        self.rank = rank
        self.world = world_size
        self.is_first = rank == 0
        self.is_leader = rank == world_size - 1
        self.accepts_stop = self.is_first  # rank 0 feeds the pipeline, so it decides when to stop
        # gloo moves CPU tensors; NCCL moves tensors on the part's own GPU.
        self.wire = torch.device("cpu") if backend == "gloo" else algorithm.device
        self.mailbox: Deque[Tensor] = deque()  # deltas received before they are due (checkpoint)
        # isend works and the tensors they read, with the channel (TRAINING or EVALUATION) and
        # the tick of that channel (a training step, an evaluation batch) they were sent at.
        self.pending: List[Tuple[int, int, Any, Tensor]] = []
        self.ticks = [0, 0]
        self.channel = TRAINING
        self.clock = PhaseClock()
        self.next_step = 0
        self.timeout_s: Optional[float] = None  # for the message when a peer stops answering

    def _waiting(self, peer: Optional[int], what: str) -> "_Waiting":
        return _Waiting(self, peer, what)

    # -- transport
    def _send(self, dst: int, tag: int, tensor: Optional[Tensor], kind: int = DATA) -> None:
        """Header then payload, both asynchronous; the tensors live until the sends complete."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = kind
        if tensor is not None:
            header[1] = DTYPES.index(tensor.dtype)
            header[2] = tensor.dim()
            header[3:3 + tensor.dim()] = torch.tensor(tensor.shape)
        header = header.to(self.wire)
        tick = self.ticks[self.channel]
        self.pending.append((self.channel, tick, dist.isend(header, dst, tag=tag), header))
        if tensor is not None:
            payload = tensor.detach().to(self.wire).contiguous()
            self.pending.append((self.channel, tick, dist.isend(payload, dst, tag=tag), payload))

    def _advance(self, channel: int) -> None:
        """Next tick of `channel`: wait for its sends of `world + 1` ticks ago and drop them.

        gloo's `is_completed()` stays False until `wait()`, so without this the list would keep
        every tensor sent since the last checkpoint (memory growing all epoch). Within a channel
        a message's receiver needs nothing newer than the next tick from this rank to take it,
        and no rank runs more than `world` ticks ahead of another, so this wait is over (or
        nearly) and cannot deadlock; it only bounds memory. The channels are kept apart because
        a training step's last delta is taken only after the evaluation that may follow it.
        """
        self.ticks[channel] += 1
        due = self.ticks[channel] - self.world - 1
        old = [entry for entry in self.pending if entry[0] == channel and entry[1] <= due]
        if not old:
            return
        with self._waiting(None, "its sends to complete"):
            for entry in old:
                entry[2].wait()
        self.pending = [entry for entry in self.pending
                        if not (entry[0] == channel and entry[1] <= due)]

    def _recv(self, src: int, tag: int) -> Tuple[int, Optional[Tensor]]:
        start = time.perf_counter()
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.wire)
        with self._waiting(src, "a message"):
            dist.recv(header, src, tag=tag)
        header = header.cpu()
        kind = int(header[0])
        payload = None
        if kind == DATA:
            shape = [int(d) for d in header[3:3 + int(header[2])]]
            payload = torch.empty(shape, dtype=DTYPES[int(header[1])], device=self.wire)
            with self._waiting(src, "a message"):
                dist.recv(payload, src, tag=tag)
        self.clock.add("wait", time.perf_counter() - start)
        return kind, payload

    def flush(self) -> None:
        with self._waiting(None, "its sends to complete"):
            for _, _, work, _ in self.pending:
                work.wait()
        self.pending = []

    # -- training
    def batches(self, data: Any, epoch: int, first_batch: int) -> Iterator[Optional[Batch]]:
        if self.is_first:
            return data.train_batches(epoch, first_batch)
        return iter([None] * (data.steps_per_epoch() - first_batch))

    def train_step(self, batch: Optional[Batch], step: int, stop: bool = False) -> Optional[ForwardResult]:
        self._advance(TRAINING)
        start = time.perf_counter()
        result = self._train_step(batch, step, stop)
        self.clock.add("step", time.perf_counter() - start)
        return result

    def _train_step(self, batch: Optional[Batch], step: int, stop: bool) -> Optional[ForwardResult]:
        algo, last = self.algo, self.world - 1
        if self.is_first:
            if stop:
                self._stop_downstream()
                return None
            assert batch is not None
            h, target = batch
            if self.world > 1:
                self._send(last, LABEL, target)
        else:
            kind, h = self._recv(self.rank - 1, ACT)
            if kind == STOP:
                self._stop_downstream()
                return None
            target = None
        if self.is_leader and not self.is_first:
            target = self._recv(0, LABEL)[1]
        result = algo.forward(h.to(algo.device), None if target is None else target.to(algo.device), step)
        if not self.is_leader:
            self._send(self.rank + 1, ACT, result.output)
        if algo.expects_delta(step):
            delta = self.mailbox.popleft() if self.mailbox else self._recv(self.rank + 1, DELTA)[1]
            assert delta is not None
            delta = delta.to(algo.device)
        else:
            delta = None
        grad_in = algo.backward(delta, step)
        if algo.sends_delta(step):
            assert grad_in is not None
            self._send(self.rank - 1, DELTA, grad_in)
        self.clock.steps += 1
        self.next_step = step + 1
        return result if self.is_leader else None

    def _stop_downstream(self) -> None:
        if not self.is_leader:
            self._send(self.rank + 1, ACT, None, kind=STOP)
        self.stopped = True

    # -- evaluation through the same pipeline (eval mode, no history)
    def evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        self.channel = EVALUATION
        try:
            return self._evaluate(data)
        finally:
            self.channel = TRAINING

    def _evaluate(self, data: Any) -> Optional[Dict[str, float]]:
        totals = EvalTotals()
        if self.is_first:
            for x, y in data.test_batches():
                self._advance(EVALUATION)  # bounds the evaluation's sends in flight too
                h = eval_forward(self.algo, x)
                if self.is_leader:
                    totals.add(h, y)
                    continue
                self._send(self.rank + 1, EVAL_ACT, h)
                self._send(self.world - 1, EVAL_LABEL, y)
            if not self.is_leader:
                self._send(self.rank + 1, EVAL_ACT, None, kind=END)
        else:
            while True:
                kind, h = self._recv(self.rank - 1, EVAL_ACT)
                if kind == END:
                    if not self.is_leader:
                        self._send(self.rank + 1, EVAL_ACT, None, kind=END)
                    break
                assert h is not None
                self._advance(EVALUATION)
                out = eval_forward(self.algo, h)
                if self.is_leader:
                    totals.add(out, self._recv(0, EVAL_LABEL)[1])  # type: ignore[arg-type]
                else:
                    self._send(self.rank + 1, EVAL_ACT, out)
        return totals.result() if self.is_leader else None

    # -- collective reads for the leader
    def timing_window(self) -> Optional[List[Dict[str, float]]]:
        mine = read_windows([self.clock], [self.algo])[0]
        keys = [*PHASES, "wait", "step", *MEMORY_KEYS]
        if not self.is_leader:
            self._send(self.world - 1, TIMING, torch.tensor([mine.get(k, -1.0) for k in keys],
                                                            dtype=torch.float64))
            return None
        rows = []
        for rank in range(self.world - 1):
            values = self._recv(rank, TIMING)[1]
            assert values is not None
            rows.append({k: v for k, v in zip(keys, values.tolist()) if v != -1.0})
        return rows + [mine]

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        self.flush()
        out: Optional[List[Any]] = [None] * self.world if self.is_leader else None
        with self._waiting(None, "the other parts to gather a checkpoint"):
            dist.gather_object(obj, out, dst=self.world - 1)
        return out

    def gather_checkpoint(self) -> Optional[Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
        # A delta sent for the next step is part of the state: take it off the wire now. (Its
        # sender finished the previous step, so it has been sent, also when a stop came.)
        if not self.algo.synchronous and self.algo.expects_delta(self.next_step) \
                and not self.mailbox:
            delta = self._recv(self.rank + 1, DELTA)[1]
            assert delta is not None
            self.mailbox.append(delta)
        mine = (_to_cpu(part_state(self.algo)), [d.cpu() for d in self.mailbox])
        gathered = self._gather(mine)
        if gathered is None:
            return None
        return [p for p, _ in gathered], {"mailboxes": [m for _, m in gathered]}

    def gather_export(self) -> Optional[List[Dict[str, Tensor]]]:
        return self._gather(_to_cpu(self.algo.part.original_state_dict()))

    def load_checkpoint(self, state: Dict[str, Any]) -> None:
        load_part_state(self.algo, state["parts"][self.rank])
        self.mailbox = deque(d.to(self.wire) for d in state["executor"]["mailboxes"][self.rank])
        self.next_step = int(state["progress"]["step"])

    def close(self) -> None:
        self.flush()


class _Waiting:
    """Turns a transport timeout into PeerStalled naming the part this process waited for."""

    def __init__(self, executor: DistributedExecutor, peer: Optional[int], what: str) -> None:
        self.executor, self.peer, self.what = executor, peer, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None or not _is_timeout(exc):
            return False
        me = self.executor.rank
        limit = f"{self.executor.timeout_s:g} s" if self.executor.timeout_s else "the timeout"
        whom = (f"part {self.peer + 1} (rank {self.peer})" if self.peer is not None
                else "the other parts")
        raise PeerStalled(f"part {me + 1} (rank {me}) waited more than {limit} "
                          f"(distributed.timeout_s) for {self.what} from {whom}", self.peer) from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------- one worker
def choose_backend(cfg: DictConfig) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    devices = list(cfg.devices or ["cpu"])
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def run_worker(cfg: DictConfig, out_dir: Path, resume: bool, rank: int, world_size: int) -> None:
    """Build this rank's part and run the shared training loop. The process group is set up."""
    from ..build import build_job, load_plugins
    from ..data import build_data
    from ..logging import build_loggers, close_loggers
    from ..trainer import run_loop
    load_plugins(cfg.plugins)
    data = build_data(cfg.data, cfg.train.seed)
    job = build_job(cfg, data.info, only_part=rank)
    if len(job.parts) != world_size:
        raise FrzooError(f"the recipe splits the model into {len(job.parts)} parts but the job has "
                         f"{world_size} processes; run one process per part.")
    device = job.devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    executor = DistributedExecutor(job.algorithms[0], rank, world_size, choose_backend(cfg))
    executor.timeout_s = cfg.distributed.timeout_s
    echo = (lambda msg: print(f"frzoo: {msg}", file=sys.stderr, flush=True))
    loggers = build_loggers(cfg.logging, out_dir=out_dir, resume=resume, echo=echo) \
        if executor.is_leader else []
    try:
        run_loop(cfg, out_dir, resume, job=job, data=data, executor=executor, loggers=loggers,
                 echo=echo)
    except BaseException:
        close_loggers(loggers, failed=True)  # mark the tracker's run failed, then report
        raise
    # Only after success: after a failure a send may never complete, and waiting for it would
    # replace the real error by a second timeout.
    executor.close()


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


def _spawned_worker(rank: int, world_size: int, cfg_dict: Dict[str, Any], out_dir: str,
                    resume: bool, port: int, parent: int, errors: Any) -> None:
    """Entry of a process started by :func:`launch`."""
    os.setpgrp()  # Ctrl-C in the terminal reaches the launcher only; it forwards it to rank 0
    _watch_parent(parent)
    os.environ.update(MASTER_ADDR=cfg_dict["distributed"]["master_addr"], MASTER_PORT=str(port))
    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(_threads(cfg, world_size))
    code = 0
    try:
        _init_group(cfg, rank, world_size)
        run_worker(cfg, Path(out_dir), resume, rank, world_size)
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


def launch(cfg: DictConfig, out_dir: Path, *, resume: bool = False, echo: Any = print) -> Dict[str, Any]:
    """Run the job with one process per part: here (spawning them) or under torchrun."""
    import json
    from ..build import num_parts_requested
    from ..trainer import prepare_out_dir, run_lock
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return torchrun_main(cfg, out_dir, resume=resume)
    from ..build import resolve_devices
    world = num_parts_requested(cfg) or 1
    resolve_devices(cfg.devices, world)  # fail before starting anything: count and existence
    prepare_out_dir(out_dir, resume)
    port = free_port(cfg.distributed.master_addr, cfg.distributed.master_port)
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(out_dir):
        procs = [ctx.Process(target=_spawned_worker, name=f"frzoo-part{r + 1}",
                             args=(r, world, cfg_dict, str(out_dir), resume, port, os.getpid(), errors))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        previous = signal.signal(signal.SIGINT, lambda *_: _forward_sigint(procs[0]))
        try:
            failure = _supervise(procs, errors, cfg.distributed.timeout_s)
        finally:
            signal.signal(signal.SIGINT, previous)
            _terminate(procs)
    if failure:
        raise failure
    return json.loads((out_dir / "summary.json").read_text())


def _forward_sigint(proc: Any) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGINT)


def _supervise(procs: List[Any], errors: Any, timeout_s: float) -> Optional[BaseException]:
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
            return _explain(procs, failed, reports, stuck, timeout_s)
        time.sleep(0.1)


def _drain(errors: Any) -> List[Tuple[int, str, bool, str, Optional[int]]]:
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    return reports


def _explain(procs: List[Any], failed: List[int],
             reports: List[Tuple[int, str, bool, str, Optional[int]]],
             stuck: Sequence[int] = (), timeout_s: float = 0.0) -> BaseException:
    """The error to raise: the first worker's own error, naming its part and rank."""
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
                f"part {culprit + 1} (rank {culprit}) stalled: part {rank + 1} waited more than "
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
        message = f"part {origin + 1} (rank {origin}, host {host}) failed: {detail}"
        return FrzooError(message) if user else RuntimeError(message)
    code = procs[origin].exitcode
    how = (f"was killed by signal {signal.Signals(-code).name}" if code and code < 0
           else f"exited with status {code}")
    return RuntimeError(f"part {origin + 1} (rank {origin}) {how}; the other parts were stopped. "
                        f"The last complete checkpoint is kept; resume with `frzoo run --resume`.")


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
def torchrun_main(cfg: DictConfig, out_dir: Path, *, resume: bool = False) -> Dict[str, Any]:
    """Join a job started by torchrun (one or several nodes): RANK/WORLD_SIZE come from it."""
    import json
    from ..build import num_parts_requested
    from ..trainer import prepare_out_dir
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    parts = num_parts_requested(cfg) or 1
    if world != parts:
        raise FrzooError(f"torchrun started {world} processes (WORLD_SIZE) but the recipe has "
                         f"{parts} parts; start one process per part "
                         f"(e.g. --nproc-per-node {parts} on one node).")
    torch.set_num_threads(_threads(cfg, world))
    _init_group(cfg, rank, world)
    try:
        if rank == world - 1:
            prepare_out_dir(out_dir, resume)
        dist.barrier()
        run_worker(cfg, out_dir, resume, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    summary = out_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}
