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
from .fx_parts import FxPart
from .profile import traced_values
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
    # the largest |difference| of the final output in train mode (None: not compared)
    train_diff: Optional[float] = None

    @property
    def exact(self) -> bool:
        return (self.problem is None and all(d == 0.0 for d in self.max_abs_diff)
                and self.train_diff in (None, 0.0))

    def first_bad_part(self) -> Optional[int]:
        return next((k for k, d in enumerate(self.max_abs_diff) if d != 0.0), None)


def _copy(value: object) -> object:
    return value.clone() if isinstance(value, Tensor) else value


@torch.no_grad()
def check_equivalence(model: nn.Module, parts: Sequence[SplitPart], sample: Tensor) -> EquivalenceReport:
    """Run the whole model and the chained parts on `sample` in eval mode and compare each
    part's output with the tensor the whole model feeds to the next part's first module (for a
    part cut out of the trace: with the values of the traced nodes it returns, every tensor of
    a multi-tensor cut; the last part's logits always with the model's own output). Where eval
    mode agrees, the final outputs are also compared in train mode (:func:`_train_mode_diff`)."""
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
        if report.problem is None and all(d == 0.0 for d in report.max_abs_diff):
            report.train_diff = _train_mode_diff(model, parts, sample)
            if report.train_diff != 0.0:
                report.problem = (
                    f"in train mode the parts' output differs from the model's (max |diff| "
                    f"{report.train_diff:g}) although eval mode agrees: the model runs code "
                    f"between its children only while training (e.g. timm's drop_rate dropout "
                    f"before the head)")
    finally:
        model.train(was_training)
    return report


def _train_mode_diff(model: nn.Module, parts: Sequence[SplitPart], sample: Tensor) -> float:
    """The largest |difference| between the whole model's output and the chained parts' in train
    mode, each run from the same RNG seed: where the parts run the model's operations in the
    model's order, dropout and drop-path draw the same masks and the outputs are equal. Eval mode
    cannot see code that acts only in training (a functional dropout between children). BatchNorm
    running statistics are restored afterwards, so the check leaves the model as it found it."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    cuda = [sample.device.index or 0] if sample.device.type == "cuda" else []
    model.train()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            whole = as_activation(model(sample))
            torch.manual_seed(0)
            h: Any = (sample,)
            for part in parts:
                h = as_activation(part(*h))
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return _max_diff(h, whole)


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
