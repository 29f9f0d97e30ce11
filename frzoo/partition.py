"""Split a model into K parts and check that the parts compute what the whole model computes.

The canonical partition is an explicit list of module names per part. Split points, the
`split.k` rule and registered presets all compile into it. A model can be cut wherever its
forward is a chain: the root's children in registration order, and, recursively, the children
of any ``nn.Sequential`` inside that chain. So ``layer3.12`` is a valid cut point in a ResNet
(``layer3`` is a Sequential of blocks) but ``layer3.12.conv2`` is not (a residual block's forward
is not a chain of its children). Whether the root's forward really is the chain of its children
cannot be read off the code, so the builder runs both on the same input and refuses to train
when they differ (:func:`check_equivalence`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import FrzooError
from .registry import suggest

WHOLE_MODEL = ""  # the name of the single part of an unsplit model: the root itself


@dataclass(frozen=True)
class Partition:
    """Module names per part, in execution order. Part k runs ``parts[k]`` one after another."""
    parts: Tuple[Tuple[str, ...], ...]

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def to_list(self) -> List[List[str]]:
        return [list(p) for p in self.parts]


class Part(nn.Module):
    """A contiguous piece of a model: its modules applied in order.

    The modules are the model's own objects (not copies), so the original parameter names are
    recovered by :meth:`original_state_dict` for export.
    """

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.names = list(names)
        self.blocks = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def original_state_dict(self) -> Dict[str, Tensor]:
        """This part's state in the whole model's parameter names."""
        return {original_key(self.names, key): value for key, value in self.state_dict().items()}

    def extra_repr(self) -> str:
        return f"names={_summarize(self.names)}"


def original_key(names: Sequence[str], key: str) -> str:
    """`blocks.{i}.{rest}` of a Part's state_dict -> `{names[i]}.{rest}` of the whole model."""
    _, index, rest = key.split(".", 2)
    name = names[int(index)]
    return f"{name}.{rest}" if name else rest


# ---------------------------------------------------------------- chain discovery
def _is_expandable(module: nn.Module) -> bool:
    """A module whose forward is, by construction, the chain of its children."""
    return type(module).forward is nn.Sequential.forward and isinstance(module, nn.Sequential)


def _root_chain(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_children()]


def _expand(model: nn.Module, chain: List[str], name: str) -> List[str]:
    i = chain.index(name)
    module = model.get_submodule(name)
    children = [f"{name}.{child}" for child, _ in module.named_children()]
    return chain[:i] + children + chain[i + 1:]


def all_cut_points(model: nn.Module) -> List[str]:
    """Every module a part may start at, in execution order (fully expanded chain, minus the first)."""
    full = _root_chain(model)
    i = 0
    while i < len(full):
        if _is_expandable(model.get_submodule(full[i])) and len(list(model.get_submodule(full[i]).children())):
            expanded = _expand(model, full, full[i])
            # keep the container itself as a valid point too: cutting before `layer3` is fine
            full = full[:i] + [full[i]] + expanded[i:]
            i += 1
        i += 1
    return full[1:]


def _chain_including(model: nn.Module, names: Sequence[str]) -> List[str]:
    """The root chain, with Sequential containers opened until every name in `names` is an entry."""
    chain = _root_chain(model)
    modules = dict(model.named_modules())
    valid = all_cut_points(model)
    for name in names:
        if name not in modules or name == "":
            raise FrzooError(f"split point '{name}' is not a module of {type(model).__name__}."
                             f"{suggest(name, valid)} {_list_valid(valid)}")
        while name not in chain and not any(c.startswith(name + ".") for c in chain):
            owner = next((c for c in chain if name.startswith(c + ".")), None)
            if owner is None:  # a module that is not reachable through the chain
                raise FrzooError(f"split point '{name}' is not on the model's forward chain. "
                                 f"{_list_valid(valid)}")
            if not _is_expandable(model.get_submodule(owner)):
                near = _near(valid, owner)
                raise FrzooError(
                    f"cannot cut at '{name}': it lies inside '{owner}' "
                    f"({type(model.get_submodule(owner)).__name__}), whose forward is not a "
                    f"chain of its children, so more than one tensor may cross the cut. "
                    f"Valid points near it: {', '.join(near)}.")
            chain = _expand(model, chain, owner)
    return chain


def _near(valid: List[str], name: str, width: int = 3) -> List[str]:
    idx = next((i for i, v in enumerate(valid) if v == name or v.startswith(name + ".")),
               None)
    if idx is None:
        return valid[: 2 * width]
    return valid[max(0, idx - width): idx + width + 1]


def _list_valid(valid: List[str]) -> str:
    if len(valid) <= 60:
        return f"Valid points: {', '.join(valid)}."
    return (f"Valid points ({len(valid)}): {', '.join(valid[:25])}, ..., "
            f"{', '.join(valid[-10:])}; `frzoo plan RECIPE --points` lists them all.")


def _summarize(names: Sequence[str]) -> str:
    if not names or names == [WHOLE_MODEL]:
        return "<whole model>"
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} modules)"


# ---------------------------------------------------------------- resolving a split
def partition_from_points(model: nn.Module, points: Sequence[str]) -> Partition:
    """Cut before each point. Points must be distinct and in execution order."""
    if not points:
        return Partition(((WHOLE_MODEL,),))
    chain = _chain_including(model, points)
    positions = [_position(chain, p) for p in points]
    valid = all_cut_points(model)
    for i, (cur, name) in enumerate(zip(positions, points)):
        if cur == 0:
            raise FrzooError(f"split point '{name}' is the model's first module: the first part "
                             f"would be empty. {_list_valid(valid)}")
        if i and cur <= positions[i - 1]:
            raise FrzooError(f"split points must be in execution order without repeats; "
                             f"'{name}' comes at or before the point before it "
                             f"(order given: {', '.join(points)}). {_list_valid(valid)}")
    bounds = [0] + positions + [len(chain)]
    return Partition(tuple(tuple(chain[a:b]) for a, b in zip(bounds, bounds[1:])))


def _position(chain: List[str], name: str) -> int:
    """Index of `name` in the chain; a container opened for a deeper point starts at its first child."""
    if name in chain:
        return chain.index(name)
    return next(i for i, entry in enumerate(chain) if entry.startswith(name + "."))


def partition_from_parts(model: nn.Module, parts: Sequence[Sequence[str]]) -> Partition:
    """Validate explicit module lists: together, in order, they must be the model's whole chain."""
    flat = [n for p in parts for n in p]
    chain = _chain_including(model, flat)
    if flat != chain:
        missing = [n for n in chain if n not in flat]
        problem = (f"missing: {', '.join(missing[:8])}" if missing
                   else f"out of execution order; expected {', '.join(chain)}")
        raise FrzooError(f"split.parts must list every module of the forward chain exactly "
                         f"once, in execution order; {problem}.")
    return Partition(tuple(tuple(p) for p in parts))


def block_list(model: nn.Module) -> Tuple[List[str], List[str], List[str]]:
    """(stem, blocks, head): the root chain with each top-level Sequential opened into blocks."""
    stem: List[str] = []
    blocks: List[str] = []
    head: List[str] = []
    for name in _root_chain(model):
        module = model.get_submodule(name)
        if _is_expandable(module) and len(module):
            blocks += [f"{name}.{c}" for c, _ in module.named_children()]
            head.clear()  # anything between groups of blocks counts as a block
        elif blocks:
            head.append(name)
        else:
            stem.append(name)
    blocks_and_between = [n for n in _chain_including(model, blocks) if n not in stem + head]
    return stem, blocks_and_between, head


def points_for_k(model: nn.Module, k: int) -> List[str]:
    """The authors' rule: blocks cut into contiguous chunks of ceil(n/K); stem goes with the first
    chunk, pool and classifier with the last."""
    if k == 1:
        return []
    _, blocks, _ = block_list(model)
    if len(blocks) < k:
        raise FrzooError(f"cannot split {type(model).__name__} into K={k} parts: its forward "
                         f"chain has only {len(blocks)} blocks ({', '.join(blocks) or 'none'}). "
                         f"Use K <= {max(len(blocks), 1)} or give split.points.")
    size = math.ceil(len(blocks) / k)
    points = [blocks[i] for i in range(size, len(blocks), size)]
    if len(points) != k - 1:  # ceil chunks can leave fewer parts than asked (e.g. 10 blocks, K=4)
        size = len(blocks) / k
        points = [blocks[round(i * size)] for i in range(1, k)]
    return points


def resolve_partition(model: nn.Module, arch: str, *, points: Optional[Sequence[str]],
                      parts: Optional[Sequence[Sequence[str]]], k: Optional[int],
                      presets: Optional[Dict[int, List[str]]] = None) -> Partition:
    """Compile whichever form the recipe used into the canonical partition."""
    if parts is not None:
        return partition_from_parts(model, parts)
    if points is not None:
        return partition_from_points(model, list(points))
    k = k or 1
    if presets and k in presets:
        return partition_from_points(model, presets[k])
    return partition_from_points(model, points_for_k(model, k))


def build_parts(model: nn.Module, partition: Partition) -> List[Part]:
    """Part modules sharing the model's own submodules. Every parameter must land in one part."""
    if partition.parts == ((WHOLE_MODEL,),):
        return [Part([WHOLE_MODEL], [model])]
    parts = [Part(names, [model.get_submodule(n) for n in names]) for names in partition.parts]
    owned = {id(t) for p in parts for t in [*p.parameters(), *p.buffers()]}
    orphans = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if id(t) not in owned]
    if orphans:
        raise FrzooError(
            f"{type(model).__name__} keeps tensors outside the modules of its forward chain "
            f"({', '.join(orphans[:5])}): its forward is not a chain of children, so it cannot "
            f"be split this way yet. Train it unsplit (K=1).")
    seen: Dict[int, int] = {}
    for k, part in enumerate(parts):
        for t in part.parameters():
            if seen.setdefault(id(t), k) != k:
                raise FrzooError(f"a parameter is shared between part {seen[id(t)] + 1} and part "
                                 f"{k + 1} (tied weights); move the cut so both users are in one part.")
    return parts


# ---------------------------------------------------------------- equivalence
@dataclass
class EquivalenceReport:
    """Per part: the largest |difference| between the part's output and the whole model's
    tensor at the same place. Exact (0.0 everywhere) is the only passing result."""
    max_abs_diff: List[float] = field(default_factory=list)
    shapes: List[Tuple[int, ...]] = field(default_factory=list)
    problem: Optional[str] = None

    @property
    def exact(self) -> bool:
        return self.problem is None and all(d == 0.0 for d in self.max_abs_diff)

    def first_bad_part(self) -> Optional[int]:
        return next((k for k, d in enumerate(self.max_abs_diff) if d != 0.0), None)


@torch.no_grad()
def check_equivalence(model: nn.Module, parts: Sequence[Part], sample: Tensor) -> EquivalenceReport:
    """Run the whole model and the chained parts on `sample` in eval mode and compare each
    part's output with the tensor the whole model feeds to the next part's first module."""
    was_training = model.training
    model.eval()
    report = EquivalenceReport()
    captured: Dict[int, Tensor] = {}
    hooks = []
    for k, part in enumerate(parts[1:], start=1):
        def grab(_mod: nn.Module, args: tuple, k: int = k) -> None:
            if k not in captured:
                captured[k] = args[0] if len(args) == 1 else args  # type: ignore[assignment]
        hooks.append(part.blocks[0].register_forward_pre_hook(grab))
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
