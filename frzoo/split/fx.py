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

Why not ``torch.fx.passes.split_module``: it hands every parameter or buffer read with
``get_attr`` (a ViT's ``cls_token``/``pos_embed``, a LayerScale gamma, a Swin relative-position
table) to the sub-graphs as extra INPUTS fetched by the top-level module, and it renames module
paths (``blocks.0.attn`` -> ``blocks_0_attn``). A part must take the crossing tensors and hold
its own weights under their original names, so the per-part graphs are built here directly: each part's
graph copies its nodes, re-reads the tensors it uses with its own ``get_attr``, and runs against a
holder module that contains the model's OWN module objects at their original paths (and the
root-owned tensors it uses, as the same Parameter objects). Export by original names, BatchNorm
statistics, ``.train()``/``.eval()`` and ``.to(device)`` therefore act on the model's own objects.

Python branches on ``self.training`` (drop-path, attention dropout) are resolved while tracing,
so the model is traced twice, in train and in eval mode, and each part runs the graph of its
current mode: a part behaves exactly as the same modules do inside the whole model.
"""
from __future__ import annotations

import bisect
import inspect
import operator
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import FrzooError
from ..plugins import suggest
from .costs import counting_flops
from .plan import Partition, SplitPart, check_disjoint, list_valid

_MODES = (True, False)  # training, eval: the model is traced in both
MAX_CROSSING = 8  # tensors one cut may send (one message carries them: frzoo.executors.p2p)


# ---------------------------------------------------------------- tracing
class ModelTracer(fx.Tracer):
    """torch.fx's tracer that keeps timm's registered leaf modules and functions opaque (the set
    timm's own fx feature extraction uses), besides torch.nn's built-in modules."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)


def _module_paths(node: fx.Node) -> List[str]:
    """The modules a node runs inside, outermost first (the root, '', is implied)."""
    paths = [v[0] for v in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module" and node.target not in paths:
        paths.append(str(node.target))
    return paths


@dataclass
class ModeGraph:
    """The forward traced in one mode, with what the cut rules need per node.

    The cut rule (:meth:`cut_problem`) is decided from spans computed once, in one pass over the
    graph, so that listing every candidate stays linear in the graph's size: each module's span
    (the nodes that run inside it or read its tensors), each tensor's span (its readers; tied
    tensors over all their modules), and the values crossing each boundary."""
    graph: fx.Graph
    nodes: List[fx.Node]  # in execution order
    input: fx.Node  # the one tensor the forward takes
    constants: Dict[fx.Node, Any]  # the forward's other arguments, fixed to their defaults
    output: fx.Node  # the one tensor the forward returns
    # parameters the model holds under several names (tied weights, a module registered
    # twice): the first name -> all of them
    tied: Dict[str, List[str]] = field(default_factory=dict)
    index: Dict[fx.Node, int] = field(default_factory=dict)
    first: Dict[str, int] = field(default_factory=dict)  # called module path -> its first node
    last: Dict[str, int] = field(default_factory=dict)  # called module path -> its last node
    # every module a node runs inside or reads a tensor of, called or not (a ModuleList's
    # entries are called one by one, never the list) -> (first, last) such node
    span: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    last_use: Dict[fx.Node, int] = field(default_factory=dict)  # value -> its last user
    attr_span: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # tensor -> users' span

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.nodes)}
        end = len(self.nodes)
        for i, node in enumerate(self.nodes):
            if node.op in ("placeholder", "output"):
                continue
            paths = _module_paths(node)
            for path in paths:
                self.first.setdefault(path, i)
                self.last[path] = i
            users = [end if u.op == "output" else self.index[u] for u in node.users]
            if users:
                self.last_use[node] = max(users)
            self._widen({a for p in paths for a in _ancestors(p)}, i, i)
            if node.op == "get_attr" and users:
                target = str(node.target)
                lo, hi = self.attr_span.get(target, (end, -1))
                self.attr_span[target] = (min(lo, min(users)), max(hi, max(users)))
                owner = target.rpartition(".")[0]  # its module's span covers its readers
                self._widen(_ancestors(owner) if owner else set(), min(users), max(users))
        self.last_use[self.input] = max((self.index[u] for u in self.input.users), default=-1)
        for name, aliases in self.tied.items():  # one tensor, read under any of its names
            spans = [self._read_span(alias) for alias in aliases]
            spans = [s for s in spans if s is not None]
            if spans:
                self.attr_span[name] = (min(s[0] for s in spans), max(s[1] for s in spans))
        self._sweep()

    def _read_span(self, name: str) -> Optional[Tuple[int, int]]:
        """The nodes that read tensor `name`: its get_attr readers, or the calls of the leaf
        module holding it."""
        if name in self.attr_span:
            return self.attr_span[name]
        owner = name.rpartition(".")[0]
        return (self.first[owner], self.last[owner]) if owner in self.first else None

    def _widen(self, paths: Set[str], lo: int, hi: int) -> None:
        for path in paths:
            a, b = self.span.get(path, (lo, hi))
            self.span[path] = (min(a, lo), max(b, hi))

    def _sweep(self) -> None:
        """Per boundary i (a cut before node i): whether anything runs before it, the values
        crossing it (listed where at most MAX_CROSSING do), how many of them are not tensors,
        and how many called modules and tensors run on both sides of it."""
        n = len(self.nodes)
        self._work_before = [False] * (n + 1)
        for i, node in enumerate(self.nodes):
            self._work_before[i + 1] = self._work_before[i] or (
                node.op not in ("placeholder", "output") and not self.is_free(node))
        self._straddled = _cover_counts(n, [s for p, s in self.span.items() if p in self.first])
        self._shared = _cover_counts(n, list(self.attr_span.values()))
        self._crossing: Dict[int, List[fx.Node]] = {}
        self._n_crossing = [0] * (n + 1)
        self._n_scalars = [0] * (n + 1)
        active: Dict[fx.Node, None] = {}  # insertion order is node order
        ending: Dict[int, List[fx.Node]] = {}
        for i in range(n + 1):
            for done in ending.pop(i - 1, []):  # last used before node i
                del active[done]
            if i > 0:
                node = self.nodes[i - 1]
                if not self.is_free(node) and node.op != "output" \
                        and self.last_use.get(node, -1) >= i:
                    active[node] = None
                    ending.setdefault(self.last_use[node], []).append(node)
            self._n_crossing[i] = len(active)
            if len(active) <= MAX_CROSSING:
                self._crossing[i] = list(active)
                self._n_scalars[i] = sum(_not_a_tensor(v) for v in active)

    def is_free(self, node: fx.Node) -> bool:
        """Values any part can have without receiving them: tensors it reads itself, and the
        forward arguments that were fixed to constants."""
        return node.op == "get_attr" or node in self.constants

    def crossing(self, i: int) -> List[fx.Node]:
        """Values computed before node i and used at or after it (what would have to be sent)."""
        if i in self._crossing:
            return list(self._crossing[i])
        return [n for n in self.nodes[:i]
                if not self.is_free(n) and n.op != "output" and self.last_use.get(n, -1) >= i]

    def cut_problem(self, i: int, point: str) -> Optional[str]:
        """Why a cut before node i (the first node of module `point`) is invalid, or None.

        The one rule both the builder (frzoo.split.fx.fx_partition) and the candidates
        (:attr:`valid_points`) use. Each module must run in one part: a called module that runs
        on both sides is refused unless the cut opens it (it encloses `point`); a module never
        called as a whole (a ModuleList, a Sequential its owner iterates) is opened into its
        children wherever a cut falls inside it (:func:`_open_chain`), so only its children
        count. A tensor (read with get_attr, or held by several modules) must be read in one
        part."""
        if not self._work_before[i]:
            return "nothing runs before it, so the first part would be empty"
        if self._n_crossing[i] > MAX_CROSSING:
            crossing = self.crossing(i)
            return (f"{len(crossing)} values would cross the cut "
                    f"({', '.join(_describe(n) for n in crossing[:4])}, ...), and a cut sends "
                    f"at most {MAX_CROSSING} tensors")
        if self._n_scalars[i]:
            scalar = next(n for n in self._crossing[i] if _not_a_tensor(n))
            return (f"{_describe(scalar)} crosses the cut and is not a tensor (a shape or "
                    f"a number), and a part sends tensors only")
        enclosing = _ancestors(point)
        opened = sum(1 for p in enclosing
                     if p in self.first and self.span[p][0] < i <= self.span[p][1])
        if self._straddled[i] > opened:
            path = min((p for p, (lo, hi) in self.span.items()
                        if p in self.first and lo < i <= hi and p not in enclosing),
                       key=lambda p: (self.first[p], p.count(".")))
            return (f"module '{path}' runs on both sides of the cut (it is called more than "
                    f"once, or its tensors are read outside it), so its weights would be in two "
                    f"parts")
        if self._shared[i]:
            target = next(t for t, (lo, hi) in self.attr_span.items() if lo < i <= hi)
            return f"tensor '{target}' is used on both sides of the cut (shared weights)"
        return None

    def opened(self, cuts: Sequence[int]) -> Set[str]:
        """The modules never called as a whole that these cuts fall inside (each is replaced by
        its children in the partition)."""
        return {p for p, (lo, hi) in self.span.items() if p not in self.first
                and any(lo < c <= hi for c in cuts)}

    @cached_property
    def valid_points(self) -> List[Tuple[int, List[str]]]:
        """Every valid cut, in execution order: (node index, modules starting there, outermost
        first)."""
        starting: Dict[int, List[str]] = {}
        for path, i in self.first.items():
            starting.setdefault(i, []).append(path)
        out = []
        for i in sorted(starting):
            names = sorted(starting[i], key=lambda p: p.count("."))
            if self.cut_problem(i, names[0]) is None:
                out.append((i, names))
        return out


def _cover_counts(n: int, spans: Sequence[Tuple[int, int]]) -> List[int]:
    """For each boundary i in 0..n, how many spans (lo, hi) have lo < i <= hi."""
    diff = [0] * (n + 2)
    for lo, hi in spans:
        if lo < hi:
            diff[lo + 1] += 1
            diff[min(hi, n) + 1] -= 1
    out, total = [0] * (n + 1), 0
    for i in range(n + 1):
        total += diff[i]
        out[i] = total
    return out


_SHAPE_METHODS = {"size", "dim", "numel", "tolist", "item"}


def _not_a_tensor(node: fx.Node) -> bool:
    """Values fx can tell are not tensors without running: shapes, sizes and their items."""
    if node.op == "call_method":
        return str(node.target) in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return _not_a_tensor(node.args[0])
    return False


def _describe(node: fx.Node) -> str:
    paths = _module_paths(node)
    return f"{node.name} from '{paths[-1]}'" if paths else node.name


def _ancestors(path: str) -> Set[str]:
    """`a.b.c` -> {'a', 'a.b', 'a.b.c'}: the modules whose forward a cut at `path` may open."""
    atoms = path.split(".")
    return {".".join(atoms[:j]) for j in range(1, len(atoms) + 1)}


@dataclass
class Trace:
    """A model traced in train (True) and eval (False) mode."""
    graphs: Dict[bool, ModeGraph]

    @property
    def eval(self) -> ModeGraph:
        return self.graphs[False]


_TRACES: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[int, ...], Trace]]" = \
    weakref.WeakKeyDictionary()


def trace_model(model: nn.Module) -> Trace:
    """Trace `model` in both modes (cached while its module tree is unchanged)."""
    fingerprint = tuple(id(m) for m in model.modules())
    cached = _TRACES.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params:
        raise FrzooError(f"{type(model).__name__}.forward takes no tensor argument; it cannot "
                         f"be split. Train it unsplit (K=1).")
    required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]
    if required:
        raise FrzooError(f"{type(model).__name__}.forward needs more than one input "
                         f"({params[0].name}, {', '.join(required)}); a split model takes one "
                         f"tensor. Train it unsplit (K=1).")
    concrete = {p.name: p.default for p in params[1:]}
    modes = {m: m.training for m in model.modules()}
    graphs = {}
    try:
        for training in _MODES:
            model.train(training)
            try:
                graph = ModelTracer().trace(model, concrete_args=concrete or None)
            except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
                raise FrzooError(
                    f"torch.fx cannot trace {type(model).__name__} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), "
                    f"so it can only be cut where its forward is a chain of its children "
                    f"(`frzoo plan RECIPE --points`); or train it unsplit (K=1).") from None
            graphs[training] = _mode_graph(model, graph, list(concrete.values()))
    finally:
        for m, flag in modes.items():
            m.training = flag
    trace = Trace(graphs)
    _TRACES[model] = (fingerprint, trace)
    return trace


def _mode_graph(model: nn.Module, graph: fx.Graph, defaults: List[Any]) -> ModeGraph:
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise FrzooError(f"{type(model).__name__}.forward returns {type(result).__name__} in "
                         f"{'train' if model.training else 'eval'} mode, not one tensor; a split "
                         f"model's last part must return the logits alone. Train it unsplit (K=1).")
    return ModeGraph(graph, nodes, placeholders[0], dict(zip(placeholders[1:], defaults)), result,
                     _tied(model))


def _tied(model: nn.Module) -> Dict[str, List[str]]:
    """Parameters held under several names: a weight tied between two modules, or a module
    registered in two places (CoaT's shared position encodings). First name -> every name."""
    names: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {found[0]: found for found in names.values() if len(found) > 1}


# ---------------------------------------------------------------- resolving points
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
        _owners(model, graph, cuts[training], parts)  # every module and tensor in one part
    return Partition(tuple(tuple(p) for p in parts), method="fx")


def _checked_cut(model: nn.Module, mg: ModeGraph, modules: Dict[str, nn.Module],
                 point: str) -> int:
    if point not in modules or point == "":
        names = [n for n in modules if n]
        raise FrzooError(f"split point '{point}' is not a module of {type(model).__name__}."
                         f"{suggest(point, names)} {_list_valid(mg)}")
    if point not in mg.first:
        leaf = next((p for p in sorted(_ancestors(point), key=len) if p in mg.first
                     and any(n.op == "call_module" and n.target == p for n in mg.nodes)), None)
        where = (f"it runs inside '{leaf}' ({type(modules[leaf]).__name__}), which is traced as "
                 f"one operation" if leaf else "the traced forward never calls it")
        raise FrzooError(f"cannot cut at '{point}': {where}. {_near_text(mg, None, leaf)}")
    i = mg.first[point]
    problem = mg.cut_problem(i, point)
    if problem is None:
        return i
    inside = [p for p in sorted(_ancestors(point) - {point}, key=len, reverse=True)
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


def _covering(path: str, entries: Dict[str, int]) -> Optional[str]:
    """The entry that is `path` or contains it."""
    atoms = path.split(".")
    for j in range(len(atoms), 0, -1):
        candidate = ".".join(atoms[:j])
        if candidate in entries:
            return candidate
    return None


def _owners(model: nn.Module, mg: ModeGraph, cuts: List[int],
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
                entry = _covering(target, entry_part)
                if entry is None:
                    if loose.setdefault(target, k) != k:
                        raise FrzooError(
                            f"tensor '{target}' is used by part {loose[target] + 1} and part "
                            f"{k + 1} (shared weights); move the cut so both users are in one "
                            f"part.")
                else:
                    _same_part(model, target, entry, k, entry_part)
            continue
        paths = _module_paths(node)
        entry = _covering(paths[-1], entry_part) if paths else None
        if entry is not None:  # code of an opened module (or the root) may run in any part
            _same_part(model, paths[-1], entry, bisect.bisect_right(cuts, i), entry_part)
    return loose


def _same_part(model: nn.Module, path: str, entry: str, k: int, entry_part: Dict[str, int]) -> None:
    if entry_part[entry] != k:
        raise FrzooError(f"'{path}' runs in part {k + 1} but belongs to '{entry}' in part "
                         f"{entry_part[entry] + 1}: {type(model).__name__} uses it on both sides "
                         f"of a cut (called twice, or shared weights); move the cut.")


# ---------------------------------------------------------------- building parts
class FxPart(SplitPart):
    """A part cut out of the traced forward: the tensors crossing the cut before it in (as
    arguments), those crossing the cut after it out (one tensor, or a tuple of them).

    ``self.fx`` holds the model's own module objects (and root-owned tensors) at their original
    paths, so ``state_dict()`` keys are ``fx.`` + the model's own names. The part runs the graph
    traced in the mode of its first module, like a chain Part, whose behaviour is its modules':
    ``part.train()``/``part.eval()`` and ``model.train()``/``model.eval()`` both switch it.
    """

    KEY_PREFIX = "fx."  # the holder's attribute name, so every state_dict key starts with it

    def __init__(self, names: Sequence[str], holder: nn.Module,
                 graphs: Dict[bool, fx.Graph], sends: Optional[Dict[bool, List[str]]] = None) -> None:
        super().__init__()
        self.names = list(names)
        self.fx = holder
        self.graphs = graphs  # plain attribute: one fx.Graph per mode, for inspection
        # per mode, the traced model's nodes whose values this part returns (for the check)
        self.sends = sends or {}
        self._forwards = {mode: _compile(holder, graph) for mode, graph in graphs.items()}
        # The part's mode is that of its first module (one of the model's own, not registered
        # twice here: object.__setattr__ keeps it out of the module tree).
        object.__setattr__(self, "_mode_of", holder.get_submodule(self.names[0]))

    def forward(self, *xs: Tensor) -> Any:
        return self._forwards[self._mode_of.training](self.fx, *xs)

    @classmethod
    def owns_key(cls, key: str) -> bool:
        """Whether `key` is of the form an FxPart's state_dict uses."""
        return key.startswith(cls.KEY_PREFIX)

    @classmethod
    def original_key(cls, names: Sequence[str], key: str) -> str:
        """`fx.{name}` of an FxPart's state_dict -> `{name}` of the whole model."""
        return key[len(cls.KEY_PREFIX):]

    def code(self, training: Optional[bool] = None) -> str:
        """The Python code of the part's forward (in its current mode by default)."""
        mode = self._mode_of.training if training is None else training
        return self.graphs[mode].python_code(root_module="self").src

    def extra_repr(self) -> str:
        names = self.names
        return f"names={names[0] if len(names) == 1 else f'{names[0]} .. {names[-1]}'}"


def _compile(holder: nn.Module, graph: fx.Graph) -> Callable[..., Any]:
    """The generated forward of `graph`, to be called with `holder` as self. The throwaway
    GraphModule checks that every module and tensor the graph names exists in the holder."""
    return type(fx.GraphModule(holder, graph)).forward


def build_fx_parts(model: nn.Module, partition: Partition) -> List[FxPart]:
    """One FxPart per part of an fx partition (see :func:`fx_partition`)."""
    trace = trace_model(model)
    points = partition.points
    expected = fx_partition(model, points)  # validates the cuts; the names must be these
    if expected.parts != partition.parts:
        raise FrzooError(f"the partition does not match the traced forward of "
                         f"{type(model).__name__}: for split points {points} the parts are "
                         f"{expected.to_list()}.")
    graphs: List[Dict[bool, fx.Graph]] = [{} for _ in partition.parts]
    sends: List[Dict[bool, List[str]]] = [{} for _ in partition.parts]
    loose: Dict[str, int] = {}
    for training, mg in trace.graphs.items():
        cuts = [mg.first[p] for p in points]
        for target, k in _owners(model, mg, cuts, partition.parts).items():
            if loose.setdefault(target, k) != k:
                raise FrzooError(f"tensor '{target}' is used by part {loose[target] + 1} in one "
                                 f"mode and by part {k + 1} in the other; move the cut.")
        bounds = [0, *cuts, len(mg.nodes)]
        sent = [mg.crossing(c) for c in cuts]  # the tensors crossing each cut, in node order
        ins, outs = [[mg.input], *sent], [*sent, [mg.output]]
        for k in range(len(partition.parts)):
            graphs[k][training] = _part_graph(mg, bounds[k], bounds[k + 1], ins[k], outs[k])
            sends[k][training] = [n.name for n in outs[k]]
    covered = dict.fromkeys((n for names in partition.parts for n in names), 0)
    unused = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]
              if _covering(n, covered) is None and n not in loose]
    last = len(partition.parts) - 1
    parts = []
    for k, names in enumerate(partition.parts):
        own = [t for t, owner in loose.items() if owner == k] + (unused if k == last else [])
        holder = _holder(model, names, own)
        parts.append(FxPart(names, holder, {m: _protect_input(g, holder)
                                            for m, g in graphs[k].items()}, sends[k]))
    check_disjoint(parts)
    return parts


def _part_graph(mg: ModeGraph, a: int, b: int, sources: Sequence[fx.Node],
                results: Sequence[fx.Node]) -> fx.Graph:
    """Nodes [a, b) of the traced forward as a graph taking the tensors `sources` and returning
    `results` (one tensor where one crosses, else a tuple)."""
    graph = fx.Graph()
    env: Dict[fx.Node, Any] = dict(mg.constants)
    for j, source in enumerate(sources):
        env[source] = graph.placeholder("x" if len(sources) == 1 else f"x{j}")

    def value(node: fx.Node) -> Any:
        if node not in env:  # a tensor the part reads itself: its own get_attr, just in time
            assert node.op == "get_attr", f"{node} crosses a validated cut"
            env[node] = graph.get_attr(str(node.target))
        return env[node]

    for node in mg.nodes[a:b]:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        env[node] = graph.node_copy(node, value)
    out = [value(r) for r in results]
    graph.output(out[0] if len(out) == 1 else tuple(out))
    graph.lint()
    return graph


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.setitem}


def _mutates(node: fx.Node, holder: nn.Module) -> bool:
    """Whether `node` may write into its first argument."""
    if node.op == "call_module":
        return bool(getattr(holder.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_")))
    return False


# operations whose result may share its first argument's memory: views, and operations that
# return their input unchanged in some mode or for some argument (dropout in eval mode, `.to`
# to the same dtype, `.contiguous` of a contiguous tensor)
_ALIASING = {"getitem", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
             "transpose", "permute", "t", "contiguous", "expand", "expand_as", "squeeze",
             "unsqueeze", "narrow", "select", "unbind", "chunk", "split", "tensor_split",
             "movedim", "moveaxis", "swapaxes", "swapdims", "as_strided", "detach", "unfold",
             "diagonal", "to", "type", "type_as", "float", "half", "bfloat16", "double",
             "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
             "feature_alpha_dropout", "drop_path", "identity"}


def _aliases(node: fx.Node, holder: nn.Module) -> bool:
    """Whether `node`'s result may be (a view of) its first argument. A leaf module without
    weights may return its input (nn.Identity, dropout in eval mode, nn.Flatten); one with
    weights computes a new tensor."""
    if node.op == "call_module":
        module = holder.get_submodule(str(node.target))
        return next(iter(module.parameters()), None) is None \
            and next(iter(module.buffers()), None) is None
    if node.op in ("call_method", "call_function"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return str(name) in _ALIASING
    return False


def _written(source: fx.Node, holder: nn.Module) -> bool:
    """Whether the graph may write into input `source` in place: an in-place operation on it or
    on a value that may share its memory (the output of an nn.Identity before a
    ReLU(inplace=True), a view of it)."""
    same = {source}
    for node in source.graph.nodes:  # execution order: an alias is known before its users
        if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] not in same:
            continue
        if _mutates(node, holder):
            return True
        if _aliases(node, holder):
            same.add(node)
    return False


def _protect_input(graph: fx.Graph, holder: nn.Module) -> fx.Graph:
    """Clone an input first when the part would write into it: Features Replay keeps the inputs
    for the replay, so the part must not change them (the whole model does not care); and the
    input of a part that receives it is a leaf that requires a gradient, which autograd
    refuses to write into."""
    sources = [n for n in graph.nodes if n.op == "placeholder"]
    for source in sources:
        if _written(source, holder):
            with graph.inserting_after(sources[-1]):
                copy = graph.call_method("clone", (source,))
            source.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    return graph


@torch.no_grad()
def traced_values(model: nn.Module, names: Set[str], sample: Tensor) -> Dict[str, Tensor]:
    """The values of the nodes `names` of the model's eval-mode trace on `sample` (copies, taken
    when computed: a later in-place operation does not change them). The model must be in eval
    mode; frzoo.split.check compares each FxPart's outputs with these."""
    mg = trace_model(model).eval
    values: Dict[str, Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if node.name in names:
                values[node.name] = out.clone() if isinstance(out, Tensor) else out
            return out

    Recorder(fx.GraphModule(model, mg.graph)).run(sample, *mg.constants.values())
    return values


def _holder(model: nn.Module, entries: Sequence[str], tensors: Sequence[str]) -> nn.Module:
    """A module tree with the model's own modules at `entries` and its own tensors at `tensors`,
    under their original paths (intermediate levels are empty modules)."""
    holder = nn.Module()
    for name in entries:
        parent, _, attr = name.rpartition(".")
        _level(holder, parent).add_module(attr, model.get_submodule(name))
    for name in tensors:
        parent, _, attr = name.rpartition(".")
        owner, target = model.get_submodule(parent), _level(holder, parent)
        value = getattr(owner, attr)
        if attr in owner._parameters:
            target.register_parameter(attr, value)
        else:  # a buffer keeps its persistence; a plain tensor attribute (a constant fx
            # stored on the model while tracing) moves with the part but is not saved
            persistent = attr in owner._buffers and attr not in owner._non_persistent_buffers_set
            target.register_buffer(attr, value, persistent=persistent)
    return holder


def _level(holder: nn.Module, path: str) -> nn.Module:
    module = holder
    for atom in path.split(".") if path else []:
        if atom not in module._modules:
            module.add_module(atom, nn.Module())
        module = module._modules[atom]  # type: ignore[assignment]
    return module


# ---------------------------------------------------------------- candidates
@dataclass
class Block:
    """The stretch of the forward from one valid cut to the next."""
    point: str  # the module the block starts at ('' for the model's input)
    aliases: List[str]  # other modules starting at the same place
    params: int  # parameters first used in this block
    flops: int  # 2 per multiply-add of convolutions, linear layers and matrix products
    input_shapes: List[Tuple[int, ...]]  # the tensors that cross the cut before the block
    input_bytes: int  # of all of them

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The shape of the one tensor crossing the cut (the first, where several cross)."""
        return self.input_shapes[0]


def profile_blocks(model: nn.Module, sample: Tensor) -> List[Block]:
    """Every valid cut of `model`, with the parameters, FLOPs and input activation of the block
    that starts there, measured on `sample` in eval mode."""
    trace = trace_model(model)
    mg = trace.eval
    flops, shapes = _run_profile(model, mg, sample)
    valid = [(i, names) for i, names in mg.valid_points if _valid_in_train(trace, names[0])
             and all(n in shapes for n in mg.crossing(i))]  # only tensors cross
    starts = [0] + [i for i, _ in valid]
    params = [0] * len(starts)
    for i, t in _first_uses(model, mg):
        params[bisect.bisect_right(starts, i) - 1] += t.numel()
    flops_per_block = [0] * len(starts)
    for i, node in enumerate(mg.nodes):
        flops_per_block[bisect.bisect_right(starts, i) - 1] += flops.get(node, 0)
    blocks = [Block("", [], params[0], flops_per_block[0], [tuple(sample.shape)],
                    sample.numel() * sample.element_size())]
    for j, (i, names) in enumerate(valid, start=1):
        crossing = [shapes[n] for n in mg.crossing(i)]
        blocks.append(Block(names[0], names[1:], params[j], flops_per_block[j],
                            [shape for shape, _ in crossing], sum(size for _, size in crossing)))
    return blocks


def _first_uses(model: nn.Module, mg: ModeGraph) -> List[Tuple[int, nn.Parameter]]:
    """Every parameter with the index of the node that first uses it."""
    out: List[Tuple[int, nn.Parameter]] = []
    seen: Set[int] = set()
    for i, node in enumerate(mg.nodes):
        if node.op == "call_module":
            tensors = list(model.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr" and node.users:
            value = _attr(model, str(node.target))
            tensors = [value] if isinstance(value, nn.Parameter) else []
            i = min((mg.index[u] for u in node.users if u.op != "output"), default=i)
        else:
            tensors = []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append((i, t))
    return out


def graph_blocks(model: nn.Module) -> List[str]:
    """The model's blocks as the trace sees them, for the authors' rule (`split.k`) where the
    forward chain has too few: the cuts crossed by ONE tensor (between residual blocks, not
    inside them) that start a stretch holding a weight matrix or kernel (a parameter of 2 or more
    dims), so a stretch of norms and activations joins the block before it. The stretch from the
    input (the stem) and the one that ends at the output (the head) are not blocks: they join
    the first and the last, as in the authors' rule."""
    trace = trace_model(model)
    mg = trace.eval
    singles = [(i, names[0]) for i, names in mg.valid_points
               if len(mg.crossing(i)) == 1 and _valid_in_train(trace, names[0])]
    weighted = sorted(i for i, t in _first_uses(model, mg) if t.dim() >= 2)
    ends = [i for i, _ in singles[1:]] + [len(mg.nodes)]
    blocks = [name for (start, name), end in zip(singles, ends)
              if bisect.bisect_left(weighted, start) < bisect.bisect_left(weighted, end)]
    return blocks[:-1]


def _valid_in_train(trace: Trace, point: str) -> bool:
    mg = trace.graphs[True]
    return point in mg.first and mg.cut_problem(mg.first[point], point) is None


def _attr(model: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _run_profile(model: nn.Module, mg: ModeGraph, sample: Tensor
                 ) -> Tuple[Dict[fx.Node, int], Dict[fx.Node, Tuple[Tuple[int, ...], int]]]:
    """FLOPs of every node (frzoo.split.costs.counting_flops, inside modules and in the traced
    code alike) and the shape and size of every tensor value, from one eval forward."""
    flops: Dict[fx.Node, int] = {}
    shapes: Dict[fx.Node, Tuple[Tuple[int, ...], int]] = {}

    class Profiler(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            before = flops_so_far()
            out = super().run_node(node)
            flops[node] = flops_so_far() - before
            if isinstance(out, Tensor):
                shapes[node] = (tuple(out.shape), out.numel() * out.element_size())
            return out

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), counting_flops() as flops_so_far:
            Profiler(fx.GraphModule(model, mg.graph)).run(sample, *mg.constants.values())
    finally:
        for m, flag in modes.items():
            m.training = flag
    return flops, shapes
