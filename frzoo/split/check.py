"""Whether the parts compute what the whole model computes, bit for bit.

Run before anything trains: a chain split of a model whose forward is not really the chain of its
children (functional code between them) differs here, and frzoo.split.resolve then cuts the traced
forward instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .chain import Part
from .plan import SplitPart


@dataclass
class EquivalenceReport:
    """Per part: the largest |difference| between the part's output and the whole model's
    tensor at the same place. Exact (0.0 everywhere) is the only passing result."""
    max_abs_diff: List[float] = field(default_factory=list)
    shapes: List[Tuple[int, ...]] = field(default_factory=list)
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
    part's output with the tensor the whole model feeds to the next part's first module."""
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
        else:  # an FxPart receives the tensor its first module (the split point) is called with
            def grab_first(_mod: nn.Module, args: tuple, kwargs: dict, k: int = k) -> None:
                if k not in captured:
                    captured[k] = _copy(next(iter([*args, *kwargs.values()]), None))  # type: ignore
            hooks.append(model.get_submodule(part.names[0]).register_forward_pre_hook(
                grab_first, with_kwargs=True))
    try:
        expected_out = model(sample)
    finally:
        for h in hooks:
            h.remove()
    try:
        h = sample
        for k, part in enumerate(parts):
            h = part(h)
            expected = captured.get(k + 1) if k + 1 < len(parts) else expected_out
            if expected is None:
                report.problem = (f"module '{parts[k + 1].names[0]}' (the start of part {k + 2}) "
                                  f"is never called by the model's forward")
                break
            if not isinstance(expected, Tensor) or not isinstance(h, Tensor):
                report.problem = (f"more than one tensor crosses the cut after part {k + 1}")
                break
            report.shapes.append(tuple(h.shape))
            if h.shape != expected.shape:
                report.max_abs_diff.append(float("inf"))
            else:
                report.max_abs_diff.append(float((h - expected).abs().max()) if h.numel() else 0.0)
    finally:
        model.train(was_training)
    return report
