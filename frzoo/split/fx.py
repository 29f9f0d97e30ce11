"""Split a model whose forward is not a plain chain of its children, by tracing it with torch.fx.

The chain split (frzoo.split.chain) needs the root's forward to be ``for m in children: x = m(x)``.
Most timm models are not quite that: a ViT concatenates its class token and adds a position
embedding that the root owns, a Mixer averages tokens between its last norm and its head, a Swin
or ConvNeXt stage is not an ``nn.Sequential``. Here the forward is traced into a graph of
operations (timm's own leaf modules and functions stay opaque, as in timm's fx feature
extraction), and a cut BEFORE module M puts every node before M's first node in one part and the
rest in the next. Every value computed before the cut and used after it crosses it: the part
sends them all, as a tuple (frzoo.activation). Inside a residual block the block's input (the
skip) and the branch cross; inside a ViT block the residual stream and the branch. A cut is
refused where a module or a weight would run on both sides, where nothing runs before it, or
where more than MAX_CROSSING values cross.

How a part is built from its stretch of the graph, and why not with
``torch.fx.passes.split_module``: frzoo.split.fx_parts.

Python branches on ``self.training`` (drop-path, attention dropout) are resolved while tracing,
so the model is traced twice, in train and in eval mode, and each part runs the graph of its
current mode: a part behaves exactly as the same modules do inside the whole model.

The modules: ``trace`` (the two traced graphs and the cut rule), this one (the partition: split
points -> module names per part, every module and tensor owned by one part), ``fx_parts`` (the
parts: :class:`FxPart`, one graph per part and mode), ``inplace`` (a part never writes into the
input Features Replay keeps) and ``profile`` (what each stretch between valid cuts costs).
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Set, Tuple

from torch import nn

from ..errors import FrzooError
from ..plugins import suggest
from .plan import Partition, list_valid
from .trace import ModeGraph, ancestors, module_paths, trace_model


def fx_partition(model: nn.Module, points: Sequence[str]) -> Partition:
    """The partition for cuts before `points` in the traced forward: module names per part.

    The names are the root's children, with every module that contains a split point replaced by
    its children until the point itself is an entry (like the chain split, but any module may be
    opened, not only ``nn.Sequential``), ordered by their first call and grouped by part.
    """
    trace = trace_model(model)
    modules = dict(model.named_modules())
    cuts: Dict[bool, List[int]] = {}
    for training, mg in trace.graphs.items():
        cuts[training] = [_checked_cut(model, mg, modules, p) for p in points]
        for a, b, name in zip(cuts[training], cuts[training][1:], points[1:]):
            if b <= a:
                raise FrzooError(
                    f"split points must be in execution order without repeats; '{name}' runs at "
                    f"or before the point before it (order given: {', '.join(points)}). "
                    f"{_list_valid(mg)}")
    opened = set().union(*(g.opened(cuts[t]) for t, g in trace.graphs.items()))
    entries = _open_chain(model, points, opened)
    mg = trace.eval
    # The part of an entry: where it is first called, or for a container never called as a
    # whole (a ModuleList), where its children are first used; a module never used follows its
    # predecessor. Within a part, entries keep the order of their first call, with such
    # containers after their predecessor (the order partitions have always been recorded in).
    key: Dict[str, Tuple[int, bool]] = {}
    part_of: Dict[str, int] = {}
    previous = -1
    for name in entries:
        previous = mg.first.get(name, previous)
        used = mg.first[name] if name in mg.first else mg.span.get(name, (previous, 0))[0]
        part_of[name] = bisect.bisect_right(cuts[False], used)
        # where the predecessor lies in another part, the first use orders it, after the
        # point where both start at a cut
        moved = bisect.bisect_right(cuts[False], previous) != part_of[name]
        key[name] = (used if moved else previous, moved)
    entries.sort(key=key.__getitem__)
    parts: List[List[str]] = [[] for _ in range(len(points) + 1)]
    for name in entries:
        parts[part_of[name]].append(name)
    for k, point in enumerate(points, start=1):  # a container point starts at its first child
        assert parts[k] and (parts[k][0] == point or parts[k][0].startswith(point + ".")), \
            (parts[k][:1], point)
    for training, graph in trace.graphs.items():
        tensor_owners(model, graph, cuts[training], parts)  # every module and tensor in one part
    return Partition(tuple(tuple(p) for p in parts), method="fx")


def _checked_cut(model: nn.Module, mg: ModeGraph, modules: Dict[str, nn.Module],
                 point: str) -> int:
    if point not in modules or point == "":
        names = [n for n in modules if n]
        raise FrzooError(f"split point '{point}' is not a module of {type(model).__name__}."
                         f"{suggest(point, names)} {_list_valid(mg)}")
    if point not in mg.first:
        leaf = next((p for p in sorted(ancestors(point), key=len) if p in mg.first
                     and any(n.op == "call_module" and n.target == p for n in mg.nodes)), None)
        where = (f"it runs inside '{leaf}' ({type(modules[leaf]).__name__}), which is traced as "
                 f"one operation" if leaf else "the traced forward never calls it")
        raise FrzooError(f"cannot cut at '{point}': {where}. {_near_text(mg, None, leaf)}")
    i = mg.first[point]
    problem = mg.cut_problem(i, point)
    if problem is None:
        return i
    inside = [p for p in sorted(ancestors(point) - {point}, key=len, reverse=True)
              if mg.first.get(p, i) < i]
    owner = (f"'{inside[0]}' ({type(modules[inside[0]]).__name__})" if inside
             else f"the forward of {type(model).__name__}")
    raise FrzooError(f"cannot cut at '{point}': it lies inside {owner}, and there {problem}. "
                     f"{_near_text(mg, i, point)}")


def _near_text(mg: ModeGraph, i: Optional[int], name: Optional[str], width: int = 3) -> str:
    valid = mg.valid_points
    if not valid:
        return "The traced forward has no valid cut point; train it unsplit (K=1)."
    if i is None and name is not None and name in mg.first:
        i = mg.first[name]
    at = bisect.bisect_left([v[0] for v in valid], i) if i is not None else 0
    near = [names[0] for _, names in valid[max(0, at - width): at + width]]
    return f"Valid points near it: {', '.join(near)}."


def _list_valid(mg: ModeGraph) -> str:
    return list_valid([names[0] for _, names in mg.valid_points], "--candidates")


def _open_chain(model: nn.Module, points: Sequence[str], opened: Set[str] = frozenset()
                ) -> List[str]:
    """The root's children, with every module that encloses a point, or is in `opened` (never
    called as a whole, with a cut inside it), replaced by its children. A module registered
    under two names is listed under the one the trace calls it by (its first in
    ``named_modules``), once."""
    canonical = {id(m): name for name, m in model.named_modules()}

    def children(owner: str) -> List[str]:
        prefix = f"{owner}." if owner else ""
        return [prefix + c for c, m in model.get_submodule(owner).named_children()
                if canonical[id(m)] == prefix + c]

    chain = children("")
    for point in points:
        while point not in chain:
            owner = next(c for c in chain if point.startswith(c + "."))
            i = chain.index(owner)
            chain[i:i + 1] = children(owner)
    while True:
        inside = next((i for i, c in enumerate(chain) if c in opened), None)
        if inside is None:
            return chain
        chain[inside:inside + 1] = children(chain[inside])


def covering_entry(path: str, entries: Dict[str, int]) -> Optional[str]:
    """The entry that is `path` or contains it."""
    atoms = path.split(".")
    for j in range(len(atoms), 0, -1):
        candidate = ".".join(atoms[:j])
        if candidate in entries:
            return candidate
    return None


def tensor_owners(model: nn.Module, mg: ModeGraph, cuts: List[int],
            parts: Sequence[Sequence[str]]) -> Dict[str, int]:
    """Check that each part's nodes use only its own entries; return the part of each tensor
    read with get_attr that no entry covers (the root's own cls_token, pos_embed, ...)."""
    entry_part = {name: k for k, names in enumerate(parts) for name in names}
    loose: Dict[str, int] = {}
    for i, node in enumerate(mg.nodes):
        if node.op in ("placeholder", "output") or node in mg.constants:
            continue
        if node.op == "get_attr":
            target = str(node.target)
            for user in node.users:
                k = len(cuts) if user.op == "output" else bisect.bisect_right(cuts, mg.index[user])
                entry = covering_entry(target, entry_part)
                if entry is None:
                    if loose.setdefault(target, k) != k:
                        raise FrzooError(
                            f"tensor '{target}' is used by part {loose[target] + 1} and part "
                            f"{k + 1} (shared weights); move the cut so both users are in one "
                            f"part.")
                else:
                    _same_part(model, target, entry, k, entry_part)
            continue
        paths = module_paths(node)
        entry = covering_entry(paths[-1], entry_part) if paths else None
        if entry is not None:  # code of an opened module (or the root) may run in any part
            _same_part(model, paths[-1], entry, bisect.bisect_right(cuts, i), entry_part)
    return loose


def _same_part(model: nn.Module, path: str, entry: str, k: int, entry_part: Dict[str, int]) -> None:
    if entry_part[entry] != k:
        raise FrzooError(f"'{path}' runs in part {k + 1} but belongs to '{entry}' in part "
                         f"{entry_part[entry] + 1}: {type(model).__name__} uses it on both sides "
                         f"of a cut (called twice, or shared weights); move the cut.")
