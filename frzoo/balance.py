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
    """Median (forward, backward + optimizer step) seconds of each unit on `sample`, in train
    mode, in order. The update is measured too: a part holding most of the parameters (resnet18's
    layer4) spends tens of ms in it per iteration."""
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
            params = [p for m in unit for p in m.parameters() if p.grad is not None]
            step = statistics.median(_optimizer_seconds(params)) if params else 0.0
            # the update runs once per iteration in every part, like the backward: count it there
            out.append((statistics.median(fwd[1:]), statistics.median(bwd[1:]) + step))
            with torch.no_grad():
                for m in unit:
                    h = m(h)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return out


def _optimizer_seconds(params: List[nn.Parameter], repeats: int = 3) -> List[float]:
    """Seconds of an SGD step (momentum, Nesterov, weight decay) over `params`, on copies."""
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.detach().clone()
    opt = torch.optim.SGD(copies, lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.step()  # creates the momentum buffers, as in steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def part_cost(costs: Sequence[Tuple[float, float]], last: bool, algorithm: str) -> float:
    """Work of one part per iteration: fr plays, replays and backpropagates (2F + B) except the
    last part (F + B); bp and the rest do F + B."""
    forward = sum(f for f, _ in costs)
    backward = sum(b for _, b in costs)
    if algorithm == "fr" and not last:
        return 2 * forward + backward
    return forward + backward


def best_cuts(n: int, k: int, cost: Callable[[int, int, int], float]) -> List[int]:
    """Indices (into units) where parts 2..K start, minimising the largest part cost exactly.

    `cost(a, b, index)` is the cost of units[a:b] as part `index` (0-based; the cost may depend
    on the position, e.g. the history a part keeps)."""
    if n < k:
        raise FrzooError(f"cannot balance {n} blocks into K={k} parts; use K <= {n}.")
    inf = float("inf")
    # best[j][i]: the smallest possible largest cost of units[:i] split into the first j parts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            if j == k and i != n:
                continue
            for s in range(j - 1, i):
                value = max(best[j - 1][s], cost(s, i, j - 1))
                if value < best[j][i]:
                    best[j][i], back[j][i] = value, s
    cuts, i = [], n
    for j in range(k, 0, -1):
        i = back[j][i]
        cuts.append(i)
    return sorted(cuts)[1:]


def unit_flops(model: nn.Module, units: Sequence[Sequence[str]], sample: torch.Tensor) -> List[float]:
    """Forward FLOPs per sample of each unit: 2 per multiply-add of its convolutions and linears."""
    counted = [0.0]

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups
            for size in module.kernel_size:
                per_out *= size
            counted[0] += 2.0 * out.numel() * per_out
        elif isinstance(module, nn.Linear):
            counted[0] += 2.0 * out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    out: List[float] = []
    h = sample
    was_training = model.training
    model.eval()  # the count does not depend on the mode; eval accepts a batch of one
    try:
        with torch.no_grad():
            for unit in units:
                counted[0] = 0.0
                for name in unit:
                    h = model.get_submodule(name)(h)
                out.append(counted[0] / sample.shape[0])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return out


def unit_memory(model: nn.Module, units: Sequence[Sequence[str]],
                sample: torch.Tensor) -> List[Tuple[float, float, float]]:
    """Per unit: (bytes autograd saves for its backward, bytes of its input, parameter bytes)."""
    from .memory import MemoryMeter
    out = []
    h = sample
    for unit in units:
        modules = nn.ModuleList([model.get_submodule(n) for n in unit])
        meter = MemoryMeter(modules, lambda: [])
        x = h.detach().requires_grad_(True)
        with meter.recording():
            y = x.clone()
            for m in modules:
                y = m(y)
        params = float(sum(p.numel() * p.element_size() for p in modules.parameters()))
        out.append((float(meter.peak), float(h.numel() * h.element_size()), params))
        h = y.detach()
        del y
    return out


def memory_cost(rows: Sequence[Tuple[float, float, float]], index: int, num_parts: int,
                algorithm: str) -> float:
    """Bytes part `index` keeps alive: parameters and a momentum buffer each, its activations,
    and what the algorithm holds: fr K-k more inputs (its history), ddg K-k more graphs."""
    saved = sum(r[0] for r in rows)
    params = 2 * sum(r[2] for r in rows)
    extra = num_parts - 1 - index  # K - k
    if algorithm == "fr":
        return params + saved + extra * rows[0][1]
    if algorithm == "ddg":
        return params + saved * (extra + 1) + extra * rows[0][1]
    return params + saved


def balanced_points(model: nn.Module, k: int, *, by: str, algorithm: str,
                    sample: torch.Tensor) -> Tuple[List[str], List[float]]:
    """Split points for K parts balanced by `by` (time, flops, params or memory), and each
    part's cost in that measure (seconds, FLOPs per sample, parameters, bytes)."""
    units = units_of(model)
    if by in ("time", "flops"):
        if by == "time":
            costs = measure_units(model, units, sample)
        else:  # a backward costs about two forwards
            costs = [(f, 2 * f) for f in unit_flops(model, units, sample[:1])]

        def cost(a: int, b: int, index: int) -> float:
            return part_cost(costs[a:b], index == k - 1, algorithm)
    elif by == "params":
        counts = [float(sum(p.numel() for n in unit for p in model.get_submodule(n).parameters()))
                  for unit in units]

        def cost(a: int, b: int, index: int) -> float:
            return sum(counts[a:b])
    elif by == "memory":
        rows = unit_memory(model, units, sample)

        def cost(a: int, b: int, index: int) -> float:
            return memory_cost(rows[a:b], index, k, algorithm)
    else:
        raise FrzooError(f"split.auto={by!r} is not one of time, flops, params, memory.")

    cuts = best_cuts(len(units), k, cost)
    bounds = [0, *cuts, len(units)]
    shares = [cost(a, b, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return [units[c][0] for c in cuts], shares
