"""Whether the parts compute what the whole model computes, bit for bit.

Run before anything trains: a chain split of a model whose forward is not really the chain of its
children (functional code between them) differs here, and frzoo.split.resolve then cuts the traced
forward instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..activation import as_activation
from .chain import Part
from .fx import FxPart, traced_values
from .plan import SplitPart


@dataclass
class EquivalenceReport:
    """Per part: the largest |difference| between the part's output and the whole model's
    tensors at the same place. Exact (0.0 everywhere) is the only passing result."""
    max_abs_diff: List[float] = field(default_factory=list)
    # per part, the shape of its output; a tuple of shapes where several tensors cross its cut
    shapes: List[Any] = field(default_factory=list)
    problem: Optional[str] = None
    fallback_error: Optional[str] = None  # why the fx split could not replace a failed chain

    @property
    def exact(self) -> bool:
        return self.problem is None and all(d == 0.0 for d in self.max_abs_diff)

    def first_bad_part(self) -> Optional[int]:
        return next((k for k, d in enumerate(self.max_abs_diff) if d != 0.0), None)


def _copy(value: object) -> object:
    return value.clone() if isinstance(value, Tensor) else value


@torch.no_grad()
def check_equivalence(model: nn.Module, parts: Sequence[SplitPart], sample: Tensor) -> EquivalenceReport:
    """Run the whole model and the chained parts on `sample` in eval mode and compare each
    part's output with the tensor the whole model feeds to the next part's first module (for a
    part cut out of the trace: with the values of the traced nodes it returns, every tensor of
    a multi-tensor cut; the last part's logits always with the model's own output)."""
    was_training = model.training
    model.eval()
    report = EquivalenceReport()
    captured: Dict[int, Tensor] = {}
    hooks = []
    for k, part in enumerate(parts[1:], start=1):
        if isinstance(part, Part):
            def grab(_mod: nn.Module, args: tuple, k: int = k) -> None:
                if k not in captured:  # a copy: an in-place first module (ReLU) changes it
                    captured[k] = _copy(args[0]) if len(args) == 1 else args  # type: ignore
            hooks.append(part.blocks[0].register_forward_pre_hook(grab))
    try:
        expected_out = model(sample)
    finally:
        for h in hooks:
            h.remove()
    try:
        sent = [p.sends.get(False, []) for p in parts[:-1] if isinstance(p, FxPart)]
        if sent:
            traced = traced_values(model, {n for names in sent for n in names}, sample)
            for k, part in enumerate(parts[:-1]):
                if isinstance(part, FxPart):
                    captured[k + 1] = tuple(traced.get(n) for n in part.sends[False])
        h: Any = (sample,)
        for k, part in enumerate(parts):
            out = part(*h)
            expected = captured.get(k + 1) if k + 1 < len(parts) else expected_out
            if expected is None:
                report.problem = (f"module '{parts[k + 1].names[0]}' (the start of part {k + 2}) "
                                  f"is never called by the model's forward")
                break
            got, want = as_activation(out), as_activation(expected)  # type: ignore[arg-type]
            if not all(isinstance(t, Tensor) for t in (*got, *want)):
                report.problem = f"a value that is not a tensor crosses the cut after part {k + 1}"
                break
            report.shapes.append(tuple(got[0].shape) if len(got) == 1
                                 else tuple(tuple(t.shape) for t in got))
            report.max_abs_diff.append(_max_diff(got, want))
            h = got
    finally:
        model.train(was_training)
    return report


def _max_diff(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """The largest |difference| over the tensors; inf where their number or shapes differ."""
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf")
    return max((_diff(a, b) for a, b in zip(got, want)), default=0.0)


def _diff(a: Tensor, b: Tensor) -> float:
    if not a.numel():
        return 0.0
    if not (a.is_floating_point() or a.is_complex()):  # integers, masks: equal or not
        return 0.0 if torch.equal(a, b) else float("inf")
    return float((a - b).abs().max())
