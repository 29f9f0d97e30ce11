"""The wire: posting the messages of frzoo.executors.codec on torch.distributed, and what a
failed wait means.

`Wire` posts sends and receives between this rank and a peer (which messages, and when, is the
schedule's business: frzoo.executors.schedule), stages tensors where the backend reads them
(gloo moves CPU tensors, a CUDA part's through pinned host buffers; with NCCL tensors stay on the
GPU and waits only order the CUDA streams) and keeps every send until it is known to be taken.
fp16 (frzoo.loss_scale): a message may be followed, on the same pair, by one float64 number.

Failures. Every wait on torch.distributed inside the executors goes through :class:`Waiting`,
which turns a failed wait into a :class:`PeerFailure` naming this rank, what it waited for and
from whom: :class:`PeerStalled` when the wait lasted the whole `distributed.timeout_s` (the peer
is alive but does not answer), :class:`PeerLost` when it ended sooner (the peer's process went
away and closed its connection). What torch raises is recognised by where it comes from, not by
its text: torch 2.14's gloo raises a plain RuntimeError for a timeout and for a closed
connection alike (tests/test_distributed.py checks both on real processes); NCCL and the
rendezvous store raise torch's own `torch.distributed.DistError` subclasses (DistBackendError,
DistNetworkError, DistStoreError), which :func:`waited_for` recognises wherever they surface.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import FrzooError
from ..timeline import SEND
from . import codec
from .base import PhaseClock
from .codec import KIND_NAMES, Spec


# ---------------------------------------------------------------- failures
class PeerFailure(FrzooError):
    """A wait on another process failed: it stopped answering or went away."""

    def __init__(self, message: str, peer: Optional[int]) -> None:
        super().__init__(message)
        self.peer = peer  # the rank waited for; None where a collective does not say which


class PeerStalled(PeerFailure):
    """This process waited longer than distributed.timeout_s for another part."""


class PeerLost(PeerFailure):
    """The process this one waited for went away (its connection closed) before answering."""


def waited_for(exc: BaseException) -> Optional[int]:
    """When `exc` is a failed wait on another process: the rank waited for (-1 when a collective
    does not say which); None for any other error."""
    if isinstance(exc, PeerFailure):
        return -1 if exc.peer is None else exc.peer
    if isinstance(exc, dist.DistError):  # NCCL, the store: torch's own transport errors
        return -1
    return None


class Waiting:
    """`with Waiting(...):` around a wait on torch.distributed: a failure of that wait becomes a
    PeerStalled or PeerLost naming `me` (this rank's name), `what` it waited for and `whom`."""

    def __init__(self, me: str, whom: str, peer: Optional[int], what: str,
                 timeout_s: Optional[float], by: bool = False) -> None:
        self.me, self.whom, self.peer, self.what, self.timeout_s = me, whom, peer, what, timeout_s
        self.preposition = "by" if by else "from"  # a send waits for its receiver
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        # Only a wait runs inside: a RuntimeError here is the transport's (gloo raises plain
        # RuntimeErrors, NCCL torch.distributed.DistError, a RuntimeError too).
        if not isinstance(exc, RuntimeError) or isinstance(exc, PeerFailure):
            return False
        waited = time.monotonic() - self.start
        limit = f"{self.timeout_s:g} s" if self.timeout_s else "the timeout"
        if self.timeout_s and waited >= 0.9 * self.timeout_s:
            raise PeerStalled(f"{self.me} waited more than {limit} (distributed.timeout_s) for "
                              f"{self.what} {self.preposition} {self.whom}", self.peer) from exc
        raise PeerLost(f"{self.me} lost {self.whom} while waiting for {self.what} "
                       f"{self.preposition} it, after {waited:.1f} s: that process stopped or "
                       f"its connection closed", self.peer) from exc


# ---------------------------------------------------------------- the wire
class Incoming:
    """A posted receive. `take()` waits for it (the part's `wait` time) and returns its tensors
    (a tuple: frzoo.activation) on the part's device; later calls return the same tuple. In fp16
    the number that follows an activation or a delta is received with it (`side`, read by
    `side_value()`)."""

    def __init__(self, wire: "Wire", work: Any, buffer: Tensor, peer: int, what: str,
                 spec: Spec = (), rows: int = 0, side: Optional[Tuple[Any, Tensor]] = None) -> None:
        self.wire, self.work, self.buffer, self.peer, self.what = wire, work, buffer, peer, what
        self.spec, self.rows, self.side = spec, rows, side
        self.tensors: Optional[Tuple[Any, ...]] = None

    def take(self) -> Tuple[Any, ...]:
        if self.tensors is None:
            self.wait()
            self.tensors = self.wire.unpack(self.buffer, self.spec, self.rows)
        return self.tensors

    def side_value(self) -> float:
        assert self.side is not None and self.tensors is not None, "take() it first"
        return float(self.side[1].item())

    def wait(self) -> None:
        with self.wire.clock.timed("wait", what=self.what), self.wire.waiting(self.peer, self.what):
            self.work.wait()
            if self.side is not None:
                self.side[0].wait()


class Wire:
    """This rank's end of the point-to-point messages: posts sends and receives, stages their
    tensors, checks and announces their shapes (a header per kind, frzoo.executors.codec) and
    keeps each send until it is taken (:meth:`retire`)."""

    def __init__(self, layout: Any, device: torch.device, backend: str,
                 timeout_s: Optional[float]) -> None:
        self.layout, self.device, self.timeout_s = layout, device, timeout_s
        # gloo moves CPU tensors (a CUDA part's through pinned memory); NCCL the part's own GPU's.
        self.on = torch.device("cpu") if backend == "gloo" else device
        self.pinned = self.on.type == "cpu" and device.type == "cuda"
        self.clock = PhaseClock(self.on)  # `wait` on the GPU's stream when tensors stay there
        self.sent_specs: Dict[int, Spec] = {}
        self.recv_specs: Dict[int, Spec] = {}
        self.sends: List[Tuple[int, int, Any, Tensor]] = []  # (tick, peer, work, tensor)

    def waiting(self, peer: Optional[int], what: str, by: bool = False) -> Waiting:
        whom = self.layout.name(peer) if peer is not None else "the other parts"
        return Waiting(self.layout.name(), whom, peer, what, self.timeout_s, by)

    def to_wire(self, tensor: Tensor) -> Tensor:
        t = tensor.detach()
        if t.device == self.on:
            return t.contiguous()
        if self.on.type != "cpu":  # e.g. labels from the data loader onto the GPU (NCCL)
            return t.to(self.on).contiguous()
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()  # gloo reads it from the host now
        return buffer

    def from_wire(self, buffer: Tensor) -> Tensor:
        if buffer.device == self.device or self.on.type != "cpu":
            return buffer
        return buffer.to(self.device, non_blocking=True)  # from pinned memory: asynchronous

    def pack(self, values: Sequence[Optional[Tensor]], spec: Spec, rows: int) -> Tensor:
        """Several tensors in one byte buffer on the wire, each at its offset (codec.byte_layout)."""
        offsets, total = codec.byte_layout(spec, rows)
        buffer = torch.empty(total, dtype=torch.uint8, device=self.on, pin_memory=self.pinned)
        for t, offset, slot in zip(values, offsets, spec):
            if t is not None and slot is not None:
                codec.view(buffer, offset, slot, rows).copy_(t.detach(), non_blocking=True)
        if self.pinned:
            for t in values:
                if t is not None and t.device.type == "cuda":
                    torch.cuda.current_stream(t.device).synchronize()  # gloo reads it now
        return buffer

    def unpack(self, buffer: Tensor, spec: Spec, rows: int) -> Tuple[Any, ...]:
        if not codec.packed(spec):
            return (self.from_wire(buffer),)
        offsets, _ = codec.byte_layout(spec, rows)
        return tuple(None if slot is None else self.from_wire(codec.view(buffer, offset, slot, rows))
                     for offset, slot in zip(offsets, spec))

    def send(self, kind: int, peer: int, values: Sequence[Optional[Tensor]], rows: int,
             tick: int, side: Optional[float] = None) -> None:
        with self.clock.span(SEND, what=KIND_NAMES[kind]):  # `train.trace`'s timeline only
            self._send(kind, peer, values, rows, tick, side)

    def _send(self, kind: int, peer: int, values: Sequence[Optional[Tensor]], rows: int,
              tick: int, side: Optional[float] = None) -> None:
        """Post the send of a message of `kind` (its tensors: one per tensor crossing the cut,
        or the labels alone) whose receiver expects `rows` rows; the first of its kind goes after
        a header with every tensor's trailing shape and dtype; `side` (fp16), one number, right
        after it."""
        spec = codec.spec_of(values)
        codec.check_shapes(values, self.sent_specs.get(kind, spec), rows, kind,
                           self.layout.name(), self.layout.name(peer))
        if kind not in self.sent_specs:
            self._post_send(peer, codec.encode_header(kind, spec, self.layout.name()).to(self.on),
                            tick)
            self.sent_specs[kind] = spec
        if codec.packed(spec):
            self._post_send(peer, self.pack(values, spec, rows), tick)
        else:
            self._post_send(peer, self.to_wire(values[0]), tick)  # type: ignore[arg-type]
        if side is not None:
            self._post_send(peer, torch.tensor([side], dtype=torch.float64, device=self.on), tick)

    def _post_send(self, peer: int, tensor: Tensor, tick: int) -> None:
        with self.waiting(peer, "a message it sent to be taken", by=True):  # a closed pair fails here
            work = dist.isend(tensor, peer)
        self.sends.append((tick, peer, work, tensor))

    def expect(self, kind: int, peer: int, rows: int, side: bool = False) -> Incoming:
        """Post the receive of the next message of `kind` from `peer`, of `rows` rows (and, with
        `side`, of the number that follows it). The first of its kind waits for its header
        here (once per process)."""
        what = f"a {KIND_NAMES[kind]}"
        if kind not in self.recv_specs:
            header = torch.zeros(codec.HEADER_LEN, dtype=torch.int64, device=self.on)
            with self.waiting(peer, what):
                work = dist.irecv(header, peer)
            Incoming(self, work, header, peer, what).wait()
            self.recv_specs[kind] = codec.decode_header(header)
        spec = self.recv_specs[kind]
        if codec.packed(spec):
            buffer = torch.empty(codec.byte_layout(spec, rows)[1], dtype=torch.uint8,
                                 device=self.on, pin_memory=self.pinned)
        else:
            dtype, trailing = spec[0]  # type: ignore[misc]
            buffer = torch.empty((rows, *trailing), dtype=dtype, device=self.on,
                                 pin_memory=self.pinned)
        number = None
        with self.waiting(peer, what):  # posting on a closed pair fails at once
            work = dist.irecv(buffer, peer)
            if side:
                value = torch.empty(1, dtype=torch.float64, device=self.on)
                number = (dist.irecv(value, peer), value)
        return Incoming(self, work, buffer, peer, what, spec, rows, number)

    def retire(self, upto: float) -> None:
        """Wait for the sends posted at ticks <= `upto` and drop them. Within a run the
        receivers of sends `world + 1` ticks old have posted their receives (no rank runs that
        far ahead of another), so this wait is over or nearly; it bounds the tensors kept."""
        keep = []
        for entry in self.sends:
            tick, peer, work, _ = entry
            if tick > upto:
                keep.append(entry)
                continue
            with self.waiting(peer, "a message it sent to be taken", by=True):
                work.wait()
        self.sends = keep
