"""The parts of a split on the traced forward: one :class:`FxPart` per part, each running its
stretch of the train-mode or eval-mode graph against the model's own module objects.

Why not ``torch.fx.passes.split_module``: it hands every parameter or buffer read with
``get_attr`` (a ViT's ``cls_token``/``pos_embed``, a LayerScale gamma, a Swin relative-position
table) to the sub-graphs as extra INPUTS fetched by the top-level module, and it renames module
paths (``blocks.0.attn`` -> ``blocks_0_attn``). A part must take the crossing tensors and hold
its own weights under their original names, so the per-part graphs are built here directly: each
part's graph copies its nodes, re-reads the tensors it uses with its own ``get_attr``, and runs
against a holder module that contains the model's OWN module objects at their original paths
(and the root-owned tensors it uses, as the same Parameter objects). Export by original names,
BatchNorm statistics, ``.train()``/``.eval()`` and ``.to(device)`` therefore act on the model's
own objects.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.fx as fx
from torch import Tensor, nn

from ..errors import FrzooError
from .fx import covering_entry, fx_partition, tensor_owners
from .inplace import protect_input
from .plan import Partition, SplitPart, check_disjoint
from .trace import ModeGraph, trace_model


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
        for target, k in tensor_owners(model, mg, cuts, partition.parts).items():
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
              if covering_entry(n, covered) is None and n not in loose]
    last = len(partition.parts) - 1
    parts = []
    for k, names in enumerate(partition.parts):
        own = [t for t, owner in loose.items() if owner == k] + (unused if k == last else [])
        holder = _holder(model, names, own)
        parts.append(FxPart(names, holder, {m: protect_input(g, holder)
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
