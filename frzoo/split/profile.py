"""What the stretches of a traced forward cost, run on a sample: the split candidates (each valid
cut with the parameters, FLOPs and activation of the block it starts), the model's blocks for
the authors' rule, and the values of chosen nodes (for the check of the parts).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Dict, List, Set, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from .costs import counting_flops
from .trace import ModeGraph, trace_model


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
    valid = [(i, names) for i, names in mg.valid_points if trace.valid_in_train(names[0])
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
               if len(mg.crossing(i)) == 1 and trace.valid_in_train(names[0])]
    weighted = sorted(i for i, t in _first_uses(model, mg) if t.dim() >= 2)
    ends = [i for i, _ in singles[1:]] + [len(mg.nodes)]
    blocks = [name for (start, name), end in zip(singles, ends)
              if bisect.bisect_left(weighted, start) < bisect.bisect_left(weighted, end)]
    return blocks[:-1]


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
