"""How a message is encoded: its header and the packing of several tensors into one buffer.

Pure functions, no torch.distributed (frzoo.executors.wire posts what they make). A receive is
posted before its message exists, so its shape is predicted: the batch size of the step (or test
batch) it belongs to, known to every rank from the data (frzoo.data.DataModule), times the
trailing shapes and dtypes of that kind of message, which a small header carries once per kind
(the first message of each kind in this process). Where several tensors cross a cut (a skip and
a branch), a step's activation is still ONE message: the tensors packed into one byte buffer,
each at an aligned offset, their shapes and dtypes in the one header; the delta likewise, with a
slot marked empty for a tensor that has no delta (frzoo.activation). A message of one tensor is
that tensor, as it always was.

The header: int64, HEADER_LEN numbers: the number of tensors, then one slot of SLOT_LEN per
tensor (dtype index in DTYPES or -1 for no tensor, number of trailing dims, up to 8 dims).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import FrzooError

# Kinds of message: each has its own trailing shapes and dtypes, sent once in a header.
ACT, DELTA, LABEL, EVAL_ACT, EVAL_LABEL = range(5)
KIND_NAMES = ("activation", "delta", "labels", "evaluation activation", "evaluation labels")
SLOT_LEN = 10  # per tensor: dtype (-1: no tensor, a None delta), number of trailing dims, 8 dims
MAX_TENSORS = 8  # tensors one message may carry (the tensors crossing one cut)
HEADER_LEN = 1 + MAX_TENSORS * SLOT_LEN  # the number of tensors, then one slot each
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
ALIGN = 16  # each tensor of a packed message starts at a multiple of this many bytes
#: Per tensor of a message: its dtype and the shape after the batch dimension, or None (no
#: tensor: a delta that is None, see frzoo.activation).
Slot = Optional[Tuple[torch.dtype, Tuple[int, ...]]]
Spec = Tuple[Slot, ...]


def spec_of(values: Sequence[Optional[Tensor]]) -> Spec:
    """The spec of a message of these tensors (what its header says)."""
    return tuple(None if t is None else (t.dtype, tuple(t.shape[1:])) for t in values)


def byte_layout(spec: Spec, rows: int) -> Tuple[List[int], int]:
    """Byte offset of each tensor of a packed message of `rows` rows, and its total bytes."""
    offsets, end = [], 0
    for slot in spec:
        offsets.append(end)
        if slot is not None:
            nbytes = rows * math.prod(slot[1]) * torch.empty((), dtype=slot[0]).element_size()
            end += -(-nbytes // ALIGN) * ALIGN
    return offsets, max(end, 1)  # never an empty message


def packed(spec: Spec) -> bool:
    """A message of one tensor travels as that tensor; several (or a None) in one byte buffer."""
    return len(spec) != 1 or spec[0] is None


def view(buffer: Tensor, offset: int, slot: Tuple[torch.dtype, Tuple[int, ...]],
         rows: int) -> Tensor:
    """The tensor of `slot` inside a packed byte buffer, at `offset` (a view: no copy)."""
    dtype, trailing = slot
    shape = (rows, *trailing)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def describe(slots: Sequence[Any]) -> str:
    return ", ".join("none" if s is None else f"{tuple(s[1])} ({s[0]})" for s in slots)


def check_shapes(values: Sequence[Optional[Tensor]], expected: Spec, rows: int, kind: int,
                 sender: str, receiver: str) -> None:
    """A message's tensors must be what the receiver predicted: `rows` rows of the spec of the
    first message of its kind (a receive is posted before its message exists)."""
    if spec_of(values) == expected and all(t is None or t.shape[0] == rows for t in values):
        return
    raise FrzooError(
        f"{sender} sends a {KIND_NAMES[kind]} of shapes "
        f"{describe([None if t is None else (t.dtype, tuple(t.shape)) for t in values])} "
        f"but {receiver} expects "
        f"{describe([None if e is None else (e[0], (rows, *e[1])) for e in expected])}: "
        f"a receive is posted before its message exists, so a message's shapes must be "
        f"the batch size times the shapes and dtypes of the first message of its kind. "
        f"Make the part's output shapes depend on the batch size only, or use "
        f"executor=local.")


def encode_header(kind: int, spec: Spec, sender: str) -> Tensor:
    """The header announcing every tensor's trailing shape and dtype of messages of `kind`."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = len(spec)
    for i, slot in enumerate(spec):
        if i >= MAX_TENSORS or (slot is not None and (slot[0] not in DTYPES
                                                      or len(slot[1]) > SLOT_LEN - 2)):
            raise FrzooError(
                f"{sender} sends a {KIND_NAMES[kind]} of {len(spec)} tensors "
                f"({describe(list(spec))}); the distributed executor moves at most "
                f"{MAX_TENSORS} tensors per message, each of dtype "
                f"{', '.join(map(str, DTYPES))} with at most {SLOT_LEN - 1} dims. Cut where "
                f"fewer tensors cross, or use executor=local.")
        base = 1 + i * SLOT_LEN
        if slot is None:
            header[base] = -1
            continue
        header[base], header[base + 1] = DTYPES.index(slot[0]), len(slot[1])
        header[base + 2:base + 2 + len(slot[1])] = torch.tensor(slot[1], dtype=torch.int64)
    return header


def decode_header(header: Tensor) -> Spec:
    values = header.tolist()
    slots = [values[1 + i * SLOT_LEN:1 + (i + 1) * SLOT_LEN] for i in range(values[0])]
    return tuple(None if v[0] < 0 else (DTYPES[v[0]], tuple(v[2:2 + v[1]])) for v in slots)
