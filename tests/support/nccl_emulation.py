"""NCCL's point-to-point rules, emulated on gloo: a recipe plugin for tests (`plugins: [this file]`).

Loaded in every process of a distributed job, it replaces torch.distributed's point-to-point calls
(isend, irecv, send, recv, batch_isend_irecv, P2POp) by versions that keep NCCL's rules, which
gloo does not:

- tags are ignored: every message between two ranks matches in posting order (gloo would match a
  receive with the send of the same tag, hiding an order that differs on the two sides);
- one stream per pair of ranks: a rank's operations with one peer, sends and receives alike, run
  one at a time in the order it posted them (NCCL queues them on the pair's stream);
- rendezvous: a send completes only when the peer's matching receive has run (NCCL's behaviour
  for messages larger than its buffers), so two ranks that each send first wait for each other
  forever, where gloo would buffer both sends and carry on.

Operations of one `batch_isend_irecv` call run together (NCCL's group), per peer. A deadlock or a
peer that never posts shows as a timeout after the process group's timeout
(`distributed.timeout_s`), with "Timed out" in the message, like any stalled transfer.

How: each peer gets a thread that executes this rank's operations with it in order, over gloo
with one tag for payloads and one for acknowledgements; a send's work completes when the
receiver's acknowledgement arrives, which the receiver sends only once its receive has run.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_ORIGINAL = {name: getattr(dist, name) for name in ("isend", "irecv", "send", "recv",
                                                     "batch_isend_irecv", "P2POp")}
PAYLOAD_TAG, ACK_TAG = 7001, 7002  # the only tags that reach gloo
Op = Tuple[str, torch.Tensor]  # ("send" | "recv", tensor)


class EmulatedWork:
    """The handle an isend/irecv returns: done when the pair's stream has run the operation."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._done = threading.Event()
        self._error: Optional[BaseException] = None

    def finish(self, error: Optional[BaseException] = None) -> None:
        self._error = error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Any = None) -> bool:
        self._done.wait()  # the stream's own gloo calls time out after the group's timeout
        if self._error is not None:
            raise RuntimeError(f"emulated NCCL: {self.what} failed: {self._error}") from None
        return True


class PairStream:
    """This rank's operations with one peer, executed one group at a time in posting order."""

    def __init__(self, peer: int) -> None:
        self.peer = peer
        self.queue: "queue.Queue[Tuple[List[Op], List[EmulatedWork]]]" = queue.Queue()
        self.broken: Optional[BaseException] = None
        threading.Thread(target=self._run, daemon=True, name=f"nccl-emulation-peer{peer}").start()

    def post(self, ops: List[Op]) -> List[EmulatedWork]:
        works = [EmulatedWork(f"{kind} of {tuple(t.shape)} {t.dtype} with rank {self.peer}")
                 for kind, t in ops]
        self.queue.put((ops, works))
        return works

    def _run(self) -> None:
        while True:
            ops, works = self.queue.get()
            if self.broken is None:
                try:
                    self._group(ops)
                except BaseException as exc:  # noqa: BLE001 - reported through every later wait
                    self.broken = exc
            for work in works:
                work.finish(self.broken)

    def _group(self, ops: List[Op]) -> None:
        """Post every payload at once (a group's operations progress together), then
        acknowledge each receive and wait for each send's acknowledgement: the rendezvous."""
        payloads = [(_ORIGINAL["isend"] if kind == "send" else _ORIGINAL["irecv"])(
            t, self.peer, tag=PAYLOAD_TAG) for kind, t in ops]
        acks = []
        for (kind, _), work in zip(ops, payloads):
            if kind == "recv":
                work.wait()
                acks.append(_ORIGINAL["isend"](torch.ones(1), self.peer, tag=ACK_TAG))
        for (kind, _), work in zip(ops, payloads):
            if kind == "send":
                work.wait()
                _ORIGINAL["recv"](torch.zeros(1), self.peer, tag=ACK_TAG)
        for ack in acks:
            ack.wait()


_streams: Dict[int, PairStream] = {}
_lock = threading.Lock()


def _stream(peer: Optional[int]) -> PairStream:
    if peer is None:
        raise RuntimeError("emulated NCCL: a receive from any source is not supported by NCCL")
    with _lock:
        if peer not in _streams:
            _streams[peer] = PairStream(peer)
        return _streams[peer]


def isend(tensor: torch.Tensor, dst: Optional[int] = None, group: Any = None, tag: int = 0,
          **_: Any) -> EmulatedWork:
    return _stream(dst).post([("send", tensor)])[0]


def irecv(tensor: torch.Tensor, src: Optional[int] = None, group: Any = None, tag: int = 0,
          **_: Any) -> EmulatedWork:
    return _stream(src).post([("recv", tensor)])[0]


def send(tensor: torch.Tensor, dst: Optional[int] = None, group: Any = None, tag: int = 0,
         **_: Any) -> None:
    isend(tensor, dst).wait()


def recv(tensor: torch.Tensor, src: Optional[int] = None, group: Any = None, tag: int = 0,
         **_: Any) -> int:
    irecv(tensor, src).wait()
    return int(src)  # type: ignore[arg-type]


class P2POp:
    """torch.distributed.P2POp, accepting the emulated isend/irecv."""

    def __init__(self, op: Any, tensor: torch.Tensor, peer: Optional[int] = None,
                 group: Any = None, tag: int = 0, **_: Any) -> None:
        self.op, self.tensor, self.peer, self.group, self.tag = op, tensor, peer, group, tag


def batch_isend_irecv(p2p_op_list: List[Any]) -> List[EmulatedWork]:
    by_peer: Dict[int, List[Tuple[int, Op]]] = {}
    for index, op in enumerate(p2p_op_list):
        name = getattr(op.op, "__name__", "")
        kind = "send" if name == "isend" else "recv" if name == "irecv" else None
        if kind is None:
            raise RuntimeError(f"emulated NCCL: P2POp with {op.op!r}, not isend/irecv")
        by_peer.setdefault(op.peer, []).append((index, (kind, op.tensor)))
    works: List[Optional[EmulatedWork]] = [None] * len(p2p_op_list)
    for peer, items in by_peer.items():
        for (index, _), work in zip(items, _stream(peer).post([op for _, op in items])):
            works[index] = work
    return works  # type: ignore[return-value]


for _name, _value in (("isend", isend), ("irecv", irecv), ("send", send), ("recv", recv),
                      ("batch_isend_irecv", batch_isend_irecv), ("P2POp", P2POp)):
    setattr(dist, _name, _value)
