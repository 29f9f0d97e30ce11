"""Cut a model where its forward is a chain of children.

A model can be cut wherever its forward is a chain: the root's children in registration order,
and, recursively, the children of any ``nn.Sequential`` inside that chain. So ``layer3.12`` is a
valid cut point in a ResNet (``layer3`` is a Sequential of blocks) but ``layer3.12.conv2`` is not
(a residual block's forward is not a chain of its children). Whether the root's forward really is
the chain of its children cannot be read off the code, so the builder runs both on the same input
and refuses to train when they differ (frzoo.split.check).

What the chain cannot reach raises :class:`NotAChainError`; frzoo.split.resolve then cuts the
traced forward instead (frzoo.split.fx). docs/partitioning.md has the rules.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor, nn

from ..errors import FrzooError
from ..plugins import suggest
from .plan import WHOLE_MODEL, NotAChainError, Partition, SplitPart, check_disjoint, list_valid


class Part(SplitPart):
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

    @classmethod
    def original_key(cls, names: Sequence[str], key: str) -> str:
        """`blocks.{i}.{rest}` of a Part's state_dict -> `{names[i]}.{rest}` of the whole model."""
        _, index, rest = key.split(".", 2)
        name = names[int(index)]
        return f"{name}.{rest}" if name else rest

    def extra_repr(self) -> str:
        return f"names={_summarize(self.names)}"


def _starts_in_place(module: nn.Module) -> bool:
    """Whether the first operation of `module` (following Sequential containers) is in place."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return bool(getattr(module, "inplace", False))


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


def _list_valid(valid: List[str]) -> str:
    return list_valid(valid, "--points")


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


def _summarize(names: Sequence[str]) -> str:
    if not names or names == [WHOLE_MODEL]:
        return "<whole model>"
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} modules)"


# ---------------------------------------------------------------- partitions on the chain
def partition_from_points(model: nn.Module, points: Sequence[str]) -> Partition:
    """Cut before each point. Points must be distinct and in execution order. Raises
    :class:`NotAChainError` for a point the chain cannot reach."""
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
    """Validate explicit module lists: together, in order, they must be the model's whole chain.
    Raises :class:`NotAChainError` for a name the chain cannot reach."""
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


# ---------------------------------------------------------------- parts
def build_parts(model: nn.Module, partition: Partition) -> List[Part]:
    """Part modules sharing the model's own submodules. Every parameter must land in one part;
    a model that keeps tensors outside the modules of its chain (a ViT's cls_token) raises
    :class:`NotAChainError`."""
    if partition.parts == ((WHOLE_MODEL,),):
        return [Part([WHOLE_MODEL], [model])]
    parts = [Part(names, [model.get_submodule(n) for n in names]) for names in partition.parts]
    owned = {id(t) for p in parts for t in [*p.parameters(), *p.buffers()]}
    orphans = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if id(t) not in owned]
    if orphans:
        raise NotAChainError(
            f"{type(model).__name__} keeps tensors outside the modules of its forward chain "
            f"({', '.join(orphans[:5])}): its forward is not a chain of children")
    check_disjoint(parts)
    return parts
