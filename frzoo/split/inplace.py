"""A part must not write into its input: Features Replay keeps each part's input for the replay,
and a received input is a leaf that requires a gradient, which autograd refuses to write into.
The whole model does not care, so its traced code may well do it (a ReLU(inplace=True) after an
nn.Identity, ``x += ...`` on a view): :func:`protect_input` finds such writes in a part's graph
and clones the input first.
"""
from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

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


def protect_input(graph: fx.Graph, holder: nn.Module) -> fx.Graph:
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
