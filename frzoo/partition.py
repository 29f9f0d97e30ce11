"""Split a model into K parts and check that the parts compute what the whole model computes.

The canonical partition is an explicit list of module names per part. Split points, the
`split.k` rule and registered presets all compile into it. A model can be cut wherever its
forward is a chain: the root's children in registration order, and, recursively, the children
of any ``nn.Sequential`` inside that chain. So ``layer3.12`` is a valid cut point in a ResNet
(``layer3`` is a Sequential of blocks) but ``layer3.12.conv2`` is not (a residual block's forward
is not a chain of its children). Whether the root's forward really is the chain of its children
cannot be read off the code, so the builder runs both on the same input and refuses to train
when they differ (:func:`check_equivalence`).

Models whose forward is not such a chain (root-owned tensors such as a ViT's cls_token, functional
code between children, points inside modules that are not ``nn.Sequential``) are cut in their
torch.fx trace instead (frzoo.fx_split): the partition then has ``method="fx"`` and its parts are
``FxPart`` modules. The chain path stays the first choice; docs/partitioning.md has the rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import FrzooError
from .registry import suggest

FX_PREFIX = "fx."  # an FxPart's state_dict keys: FX_PREFIX + the model's own names (fx_split.py)

WHOLE_MODEL = ""  # the name of the single part of an unsplit model: the root itself


@dataclass(frozen=True)
class Partition:
    """Module names per part, in execution order. Part k runs ``parts[k]`` one after another
    (``method="chain"``), or the stretch of the traced forward that starts at its first name
    (``method="fx"``: see frzoo.fx_split)."""
    parts: Tuple[Tuple[str, ...], ...]
    method: str = "chain"

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def to_list(self) -> List[List[str]]:
        return [list(p) for p in self.parts]

    @property
    def points(self) -> List[str]:
        """The split points: the first module of every part but the first."""
        return [p[0] for p in self.parts[1:]]


class Part(nn.Module):
    """A contiguous piece of a model: its modules applied in order.

    The modules are the model's own objects (not copies), so the original parameter names are
    recovered by :meth:`original_state_dict` for export.
    """

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.names = list(names)
        self.blocks = nn.ModuleList(modules)
        # A part that starts with an in-place op (a cut before `act1`) would overwrite its input,
        # which Features Replay keeps in its history to replay: give it a copy instead.
        self.copy_input = _starts_in_place(modules[0]) if modules else False

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = x.clone()
        for block in self.blocks:
            x = block(x)
        return x

    def original_state_dict(self) -> Dict[str, Tensor]:
        """This part's state in the whole model's parameter names."""
        return {original_key(self.names, key): value for key, value in self.state_dict().items()}

    def extra_repr(self) -> str:
        return f"names={_summarize(self.names)}"


def _starts_in_place(module: nn.Module) -> bool:
    """Whether the first operation of `module` (following Sequential containers) is in place."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return bool(getattr(module, "inplace", False))


def original_key(names: Sequence[str], key: str) -> str:
    """`blocks.{i}.{rest}` of a Part's state_dict -> `{names[i]}.{rest}` of the whole model; an
    FxPart's `fx.{name}` -> `{name}`."""
    if key.startswith(FX_PREFIX):
        return key[len(FX_PREFIX):]
    _, index, rest = key.split(".", 2)
    name = names[int(index)]
    return f"{name}.{rest}" if name else rest


class NotAChainError(FrzooError):
    """A split point the chain split cannot reach (the fx split may)."""


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
                raise NotAChainError(f"split point '{name}' is not on the model's forward chain. "
                                 f"{_list_valid(valid)}")
            if not _is_expandable(model.get_submodule(owner)):
                near = _near(valid, owner)
                raise NotAChainError(
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
    try:
        chain = _chain_including(model, points)
    except NotAChainError as chain_error:
        return _fx_partition_or(chain_error, model, points)
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


def _fx_partition_or(chain_error: FrzooError, model: nn.Module, points: Sequence[str]) -> Partition:
    """The fx partition for `points`; when the model cannot be traced, the chain's own error."""
    from .fx_split import fx_partition, trace_model
    try:
        trace_model(model)
    except FrzooError as trace_error:
        raise FrzooError(f"{chain_error} ({trace_error})") from None
    return fx_partition(model, points)


def _position(chain: List[str], name: str) -> int:
    """Index of `name` in the chain; a container opened for a deeper point starts at its first child."""
    if name in chain:
        return chain.index(name)
    return next(i for i, entry in enumerate(chain) if entry.startswith(name + "."))


def partition_from_parts(model: nn.Module, parts: Sequence[Sequence[str]]) -> Partition:
    """Validate explicit module lists: together, in order, they must be the model's whole chain."""
    flat = [n for p in parts for n in p]
    try:
        chain = _chain_including(model, flat)
    except NotAChainError as chain_error:
        traced = _fx_partition_or(chain_error, model, [p[0] for p in parts[1:]])
        if traced.to_list() != [list(p) for p in parts]:
            raise FrzooError(f"split.parts does not match the traced forward of "
                             f"{type(model).__name__}; for these split points the parts are "
                             f"{traced.to_list()}. Give split.points instead.") from None
        return traced
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


def build_parts(model: nn.Module, partition: Partition) -> List[nn.Module]:
    """Part modules sharing the model's own submodules. Every parameter must land in one part.

    Chain parts (:class:`Part`), or, for an fx partition and for a model that keeps tensors
    outside the modules of its chain (a ViT's cls_token), parts cut from the traced forward
    (:class:`frzoo.fx_split.FxPart`). Every part has ``names`` (its module names) and
    ``original_state_dict()``; :func:`partition_of` gives the partition the parts implement.
    """
    if partition.parts == ((WHOLE_MODEL,),):
        return [Part([WHOLE_MODEL], [model])]
    if partition.method == "fx":
        from .fx_split import build_fx_parts
        return list(build_fx_parts(model, partition))
    parts = [Part(names, [model.get_submodule(n) for n in names]) for names in partition.parts]
    owned = {id(t) for p in parts for t in [*p.parameters(), *p.buffers()]}
    orphans = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if id(t) not in owned]
    if orphans:
        chain_error = FrzooError(
            f"{type(model).__name__} keeps tensors outside the modules of its forward chain "
            f"({', '.join(orphans[:5])}): its forward is not a chain of children")
        try:
            traced = _fx_partition_or(chain_error, model, partition.points)
        except FrzooError as exc:
            raise FrzooError(f"{chain_error}, and the split on its traced forward is refused: "
                             f"{exc}") from None
        return build_parts(model, traced)
    seen: Dict[int, int] = {}
    for k, part in enumerate(parts):
        for t in part.parameters():
            if seen.setdefault(id(t), k) != k:
                raise FrzooError(f"a parameter is shared between part {seen[id(t)] + 1} and part "
                                 f"{k + 1} (tied weights); move the cut so both users are in one part.")
    return parts


def partition_of(parts: Sequence[nn.Module]) -> Partition:
    """The partition built parts implement (an fx fallback may have re-grouped the names)."""
    from .fx_split import FxPart
    method = "fx" if any(isinstance(p, FxPart) for p in parts) else "chain"
    return Partition(tuple(tuple(p.names) for p in parts), method=method)  # type: ignore[arg-type]


def build_checked_parts(model: nn.Module, partition: Partition, sample: Tensor
                        ) -> Tuple[Partition, List[nn.Module], "EquivalenceReport"]:
    """:func:`build_parts`, then :func:`check_equivalence`; a chain split that does not compute
    what the model computes (functional code between children) is redone on the fx trace."""
    parts = build_parts(model, partition)
    report = check_equivalence(model, parts, sample)
    if report.exact or partition.method == "fx" or partition.num_parts == 1 \
            or not all(isinstance(p, Part) for p in parts):
        return partition_of(parts), parts, report
    try:
        from .fx_split import build_fx_parts, fx_partition
        traced = fx_partition(model, partition.points)
        fx_parts: List[nn.Module] = list(build_fx_parts(model, traced))
    except FrzooError as exc:
        report.fallback_error = str(exc)
        return partition_of(parts), parts, report
    return traced, fx_parts, check_equivalence(model, fx_parts, sample)


# ---------------------------------------------------------------- equivalence
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
def check_equivalence(model: nn.Module, parts: Sequence[nn.Module], sample: Tensor) -> EquivalenceReport:
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
