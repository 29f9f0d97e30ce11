"""What crosses a cut: a tuple of tensors one way, a tuple of deltas the other.

A cut inside a residual block is crossed by the skip and the branch; a cut inside a transformer
block by the residual stream and a branch. So every part takes and returns an
:data:`Activation`, a tuple of tensors (a cut crossed by one tensor is a 1-tuple), and receives
and sends :data:`Deltas`, one per tensor of its output (input), ``None`` where that tensor needs
no gradient. Only the model's input (the data) and the last part's logits are single tensors.

Which tensor gets a delta. The part that RECEIVES an activation makes every floating-point
tensor of it a leaf that requires a gradient (not in the first part, whose input is the data)
and sends back each leaf's gradient: ``None`` for an integer tensor, and ``None`` where the part
does not use that tensor differentiably (autograd leaves no gradient). The part that SENDS the
activation backpropagates only through the outputs that require a gradient and have a delta: an
output that depends on neither the part's weights nor its input (a constant made inside the
part) has no graph, and its delta, if any, is ignored.

Checkpoints store a 1-tuple as its tensor, exactly as before multi-tensor cuts existed, and a
longer one as a list (``None`` entries kept), so old checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Activation = Tuple[Tensor, ...]
Deltas = Tuple[Optional[Tensor], ...]


def as_activation(value: Union[Tensor, Sequence[Tensor]]) -> Activation:
    """A part's input or output as a tuple (a single tensor becomes a 1-tuple)."""
    return (value,) if isinstance(value, Tensor) else tuple(value)


def to_device(values: Sequence[Optional[Tensor]], device: torch.device) -> Tuple[Any, ...]:
    """Each tensor on `device` (``None`` entries stay ``None``)."""
    return tuple(None if t is None else t.to(device) for t in values)


def wants_grad(t: Tensor) -> bool:
    """Whether a received tensor gets a delta: floating-point ones do (see module docstring)."""
    return t.is_floating_point() or t.is_complex()


def leaves(values: Sequence[Tensor], requires_grad: bool) -> Activation:
    """Fresh leaves of `values` (same storage and version counter), the floating-point ones
    requiring a gradient when `requires_grad`."""
    return tuple(t.detach().requires_grad_(requires_grad and wants_grad(t)) for t in values)


def make_leaves(values: Sequence[Tensor], requires_grad: bool) -> None:
    """Turn `values` (tensors without a graph) into leaves that require a gradient, in place."""
    for t in values:
        t.requires_grad_(requires_grad and wants_grad(t))


def input_deltas(values: Sequence[Tensor]) -> Deltas:
    """The delta of each input leaf after a backward: its gradient, ``None`` where it has none."""
    return tuple(t.grad if t.requires_grad else None for t in values)


def backward(outputs: Sequence[Tensor], deltas: Sequence[Optional[Tensor]]) -> None:
    """Backpropagate `deltas` through `outputs` in one call (one pass over the shared graph).
    Outputs without a graph or without a delta are left out (module docstring)."""
    if len(deltas) != len(outputs):
        raise ValueError(f"{len(deltas)} deltas for {len(outputs)} outputs")
    pairs = [(o, d) for o, d in zip(outputs, deltas) if d is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [d for _, d in pairs])


def nbytes(values: Sequence[Optional[Tensor]]) -> int:
    """Bytes of the tensors (a multi-tensor cut sends all of them)."""
    return sum(t.numel() * t.element_size() for t in values if t is not None)


def detached(values: Sequence[Optional[Tensor]]) -> Tuple[Any, ...]:
    return tuple(None if t is None else t.detach() for t in values)


def to_saved(values: Sequence[Optional[Tensor]]) -> Union[Optional[Tensor], List[Optional[Tensor]]]:
    """The checkpoint form: a 1-tuple as its (CPU) tensor, as before; longer ones as a list."""
    cpu = [None if t is None else t.detach().cpu() for t in values]
    return cpu[0] if len(cpu) == 1 else cpu


def from_saved(saved: Union[Optional[Tensor], Sequence[Optional[Tensor]]],
               device: torch.device) -> Tuple[Any, ...]:
    """Inverse of :func:`to_saved`, on `device` (reads checkpoints of either form)."""
    values = [saved] if saved is None or isinstance(saved, Tensor) else list(saved)
    return to_device(values, device)
