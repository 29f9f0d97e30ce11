"""Tracing: a model's forward as a torch.fx graph, in train and in eval mode, with what the cut
rules need to know about every node.

timm's own leaf modules and functions stay opaque (as in timm's fx feature extraction). Python
branches on ``self.training`` (drop-path, attention dropout) are resolved while tracing, so the
model is traced twice, and each part later runs the graph of its current mode. The cut rule
itself (:meth:`ModeGraph.cut_problem`) lives here, beside the spans it is decided from, because
both the partition (frzoo.split.fx) and the candidates (frzoo.split.profile) ask it.
"""
from __future__ import annotations

import inspect
import operator
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
from torch import nn

from ..errors import FrzooError

_MODES = (True, False)  # training, eval: the model is traced in both
MAX_CROSSING = 8  # tensors one cut may send (one message carries them: frzoo.executors.p2p)


class ModelTracer(fx.Tracer):
    """torch.fx's tracer that keeps timm's registered leaf modules and functions opaque (the set
    timm's own fx feature extraction uses), besides torch.nn's built-in modules."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)


def module_paths(node: fx.Node) -> List[str]:
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
            paths = module_paths(node)
            for path in paths:
                self.first.setdefault(path, i)
                self.last[path] = i
            users = [end if u.op == "output" else self.index[u] for u in node.users]
            if users:
                self.last_use[node] = max(users)
            self._widen({a for p in paths for a in ancestors(p)}, i, i)
            if node.op == "get_attr" and users:
                target = str(node.target)
                lo, hi = self.attr_span.get(target, (end, -1))
                self.attr_span[target] = (min(lo, min(users)), max(hi, max(users)))
                owner = target.rpartition(".")[0]  # its module's span covers its readers
                self._widen(ancestors(owner) if owner else set(), min(users), max(users))
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
        children wherever a cut falls inside it (frzoo.split.fx), so only its children
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
        enclosing = ancestors(point)
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
    paths = module_paths(node)
    return f"{node.name} from '{paths[-1]}'" if paths else node.name


def ancestors(path: str) -> Set[str]:
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

    def valid_in_train(self, point: str) -> bool:
        """Whether a cut at `point` is valid in the train-mode graph too (the candidates are
        listed from the eval graph; a part must run in both)."""
        mg = self.graphs[True]
        return point in mg.first and mg.cut_problem(mg.first[point], point) is None


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
