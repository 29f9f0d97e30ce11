"""Choose split points that balance the parts (`split.auto`).

Cost of a part depends on the algorithm: under Features Replay every part but the last runs its
forward twice (play and replay) and its backward once, the last part once each; so a balanced
split gives the last part more blocks (shared/docs/ALGORITHM.md, "Ideal speed"). The backward /
forward ratio varies a lot between blocks (about 1.4 for CIFAR ResNet-56 blocks at 32x32, up to
8 for resnet18's layer4 at 1x1), so `time` measures forward and backward separately, per block.
The best contiguous split for a cost is found exactly by dynamic programming.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from .errors import FrzooError
from .partition import block_list


def units_of(model: nn.Module) -> List[List[str]]:
    """The cuttable units: the stem joins the first block, the head joins the last."""
    stem, blocks, head = block_list(model)
    if not blocks:
        return [stem + head]
    units = [[b] for b in blocks]
    units[0] = stem + units[0]
    units[-1] = units[-1] + head
    return units


def measure_units(model: nn.Module, units: Sequence[Sequence[str]], sample: torch.Tensor,
                  repeats: int = 3) -> List[Tuple[float, float]]:
    """Median (forward, backward) seconds of each unit on `sample`, in train mode, in order."""
    modules = [[model.get_submodule(n) for n in unit] for unit in units]
    was_training = model.training
    model.train()
    out: List[Tuple[float, float]] = []
    h = sample
    try:
        for unit in modules:
            fwd, bwd = [], []
            for _ in range(repeats + 1):  # the first run warms up allocators and kernels
                x = h.detach().requires_grad_(True)
                y = x.clone()  # a non-leaf, so an in-place first module (ReLU) is allowed
                start = time.perf_counter()
                for m in unit:
                    y = m(y)
                mid = time.perf_counter()
                y.backward(torch.ones_like(y))
                end = time.perf_counter()
                fwd.append(mid - start)
                bwd.append(end - mid)
            out.append((statistics.median(fwd[1:]), statistics.median(bwd[1:])))
            with torch.no_grad():
                for m in unit:
                    h = m(h)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return out


def part_cost(costs: Sequence[Tuple[float, float]], last: bool, algorithm: str) -> float:
    """Work of one part per iteration: fr plays, replays and backpropagates (2F + B) except the
    last part (F + B); bp and the rest do F + B."""
    forward = sum(f for f, _ in costs)
    backward = sum(b for _, b in costs)
    if algorithm == "fr" and not last:
        return 2 * forward + backward
    return forward + backward


def best_cuts(n: int, k: int, cost: Callable[[int, int, bool], float]) -> List[int]:
    """Indices (into units) where parts 2..K start, minimising the largest part cost exactly."""
    if n < k:
        raise FrzooError(f"cannot balance {n} blocks into K={k} parts; use K <= {n}.")
    inf = float("inf")
    # best[j][i]: min over splits of units[:i] into j parts (non-last parts) of the max cost
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        last = j == k
        for i in range(j, n + 1):
            if last and i != n:
                continue
            for s in range(j - 1, i):
                value = max(best[j - 1][s], cost(s, i, last))
                if value < best[j][i]:
                    best[j][i], back[j][i] = value, s
    cuts, i = [], n
    for j in range(k, 0, -1):
        i = back[j][i]
        cuts.append(i)
    return sorted(cuts)[1:]


def balanced_points(model: nn.Module, k: int, *, by: str, algorithm: str,
                    sample: torch.Tensor) -> Tuple[List[str], List[float]]:
    """Split points for K parts balanced by `by` ('time' or 'params'), and each part's cost."""
    units = units_of(model)
    if by == "time":
        costs = measure_units(model, units, sample)
    elif by == "params":
        costs = [(float(sum(p.numel() for n in unit
                            for p in model.get_submodule(n).parameters())), 0.0) for unit in units]
        algorithm = "bp"  # parameters are held once, whatever the algorithm
    else:
        raise FrzooError(f"split.auto={by!r} is not one of time, params.")

    def cost(a: int, b: int, last: bool) -> float:
        return part_cost(costs[a:b], last, algorithm)

    cuts = best_cuts(len(units), k, cost)
    bounds = [0, *cuts, len(units)]
    shares = [cost(a, b, b == len(units)) for a, b in zip(bounds, bounds[1:])]
    return [units[c][0] for c in cuts], shares
