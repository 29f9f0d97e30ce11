"""Exact accounting of the memory an algorithm keeps alive, per part.

On CUDA the device's peak allocated memory answers the question. On the CPU nothing does, so the
meter counts it: every tensor autograd saves for backward passes through a saved-tensor hook,
which records its storage; a finalizer on the graph's reference releases it when the graph is
freed. Storages are counted once (a view and its base, or an input that is both in the history
and saved by the first layer, count once), and parameters are not activations (autograd saves
conv weights, but they are counted with the parameters). What an algorithm holds between
iterations (Features Replay's history, DDG's stored inputs and weight copies) is added through
its `held_tensors()`.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Set, Tuple

import torch
from torch import Tensor, nn

StorageKey = Tuple[int, str]


def _key(t: Tensor) -> StorageKey:
    return (t.untyped_storage().data_ptr(), str(t.device))


def _nbytes(t: Tensor) -> int:
    return t.untyped_storage().nbytes()


class _Saved:
    """What the graph holds instead of the tensor, so that its death can be observed."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class MemoryMeter:
    """Peak bytes of (tensors saved for backward + tensors held between iterations) of one part."""

    def __init__(self, part: nn.Module, held: Callable[[], Iterable[Tensor]]) -> None:
        self.part = part
        self.held = held
        self.live: Dict[StorageKey, List[int]] = {}  # storage -> [references, bytes]
        self.peak = 0
        self._params: Set[StorageKey] = set()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Count what the forward passes inside this block save for backward."""
        self._params = {_key(p) for p in self.part.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self.observe()

    def _pack(self, tensor: Tensor) -> _Saved:
        box = _Saved(tensor)
        key = _key(tensor)
        if key in self._params or tensor.device.type == "meta":
            return box
        entry = self.live.setdefault(key, [0, _nbytes(tensor)])
        entry[0] += 1
        weakref.finalize(box, self._release, key)
        return box

    @staticmethod
    def _unpack(box: _Saved) -> Tensor:
        return box.tensor

    def _release(self, key: StorageKey) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self.live[key]

    def current(self) -> int:
        """Bytes now alive in saved tensors and held tensors, each storage counted once."""
        sizes = {key: entry[1] for key, entry in self.live.items()}
        for t in self.held():
            sizes.setdefault(_key(t), _nbytes(t))
        return sum(sizes.values())

    def observe(self) -> None:
        self.peak = max(self.peak, self.current())

    def read_peak(self) -> int:
        peak, self.peak = self.peak, self.current()
        return peak


def static_bytes(part: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Parameters and optimizer state (momentum buffers, Adam moments) of one part."""
    params = sum(_nbytes(p) for p in part.parameters())
    buffers = sum(_nbytes(b) for b in part.buffers())
    state = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, Tensor) and v.dim() > 0)
    return {"params_bytes": params + buffers, "optimizer_bytes": state}
