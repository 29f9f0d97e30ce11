"""The input-version check: a part's stored input must be unchanged when it is replayed.

Features Replay keeps each part's input from the play to the replay. A forward that writes into
its input in place (``x.mul_(2)`` in a module without an ``inplace`` attribute, which neither the
chain split nor the fx split can see) changes the stored input, and the replay then computes on
other values, silently. Every tensor carries a version counter that each in-place write bumps
(shared with its detached aliases), so the part records its inputs' versions at the play, before
its forward, and compares them right before the replay. On a mismatch, and only then, it re-runs
the forward with a hook after every module and names the first module after which an input's
version moved: the module that writes into its input.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import FrzooError


def versions(inputs: Sequence[Tensor]) -> Tuple[int, ...]:
    """The version counter of each input tensor (in-place writes bump it)."""
    return tuple(t._version for t in inputs)


def check_unchanged(part: nn.Module, index: int, inputs: Sequence[Tensor],
                    recorded: Tuple[int, ...], sample_step: int, rerun: Callable[[], None]) -> None:
    """Raise FrzooError naming the part and the module that wrote into its input, where an
    input's version differs from the one `recorded` at the play. `rerun` runs the part's forward
    on `inputs` once more (without a graph), for the search."""
    now = versions(inputs)
    if now == recorded:
        return
    changed = [j for j, (a, b) in enumerate(zip(now, recorded)) if a != b]
    writer = find_writer(part, inputs, changed, rerun)
    which = (f"input tensor {changed[0] + 1} of {len(inputs)}" if len(inputs) > 1 else "input")
    where = (f"module '{writer}' writes into it in place" if writer else
             "no module of the part writes into it when its forward is re-run: the part's own "
             "code between its modules does, or another holder of the tensor (the next part, "
             "where this part passes its input on unchanged)")
    raise FrzooError(
        f"part {index + 1} changed its stored {which} of sample {sample_step} between the play "
        f"and the replay ({where}); Features Replay replays the input as it was, so the replay "
        f"would compute on other values. Make that operation out of place (x = x * 2, not "
        f"x.mul_(2)), give the module an `inplace` attribute so frzoo copies the input first, or "
        f"cut elsewhere.")


def find_writer(part: nn.Module, inputs: Sequence[Tensor], changed: Sequence[int],
                rerun: Callable[[], None]) -> Optional[str]:
    """The first module (in the order calls finish: the innermost first) after whose forward an
    input in `changed` has a new version, in the whole model's names where the part knows them."""
    watched = [inputs[j] for j in changed]
    found: List[str] = []
    hooks = []
    for path, module in part.named_modules():
        if module is part:
            continue

        def after(_m: nn.Module, _args: tuple, _out: object, path: str = path) -> None:
            if not found and versions(watched) != before:
                found.append(path)
        hooks.append(module.register_forward_hook(after))
    before = versions(watched)
    try:
        with torch.no_grad():
            rerun()
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        return None
    return _original_name(part, found[0])


def _original_name(part: nn.Module, path: str) -> str:
    """`blocks.1` of a chain part or `fx.layer2.0` of a traced one -> the model's own name."""
    to_original = getattr(part, "original_key", None)
    names = getattr(part, "names", None)
    if to_original is None or names is None:
        return path
    try:
        return str(to_original(names, f"{path}.x"))[:-2] or path
    except (IndexError, ValueError, NotImplementedError):
        return path
