"""Choose split points that balance the parts (`split.auto`).

Cost of a part depends on the algorithm, and the algorithm class says what it is
(``part_cost`` and ``memory_cost``, frzoo.algorithms.base): under Features Replay every part but
the last runs its forward twice (play and replay) and its backward once, the last part once each;
so a balanced split gives the last part more blocks (docs/algorithm.md, "Ideal speed").
The backward / forward ratio varies a lot between blocks (about 1.4 for CIFAR ResNet-56 blocks
at 32x32, up to 8 for resnet18's layer4 at 1x1), so `time` measures forward and backward
separately, per block. The best contiguous split for a cost is found exactly by dynamic
programming.

The blocks. `flops`, `time` and `memory` balance over the candidates of the traced forward
(frzoo.split.profile: a block from each valid cut to the next, inside residual blocks too), so a part
boundary may fall inside a block and the parts come out within a few percent of each other;
`params` does too where the forward chain has fewer than K units. `time` and `memory` measure
stretches of the traced forward, each from a candidate holding FLOPs to the next (a convolution
with its norm and activation), built as the parts would be and run as they would run. A model
that cannot be traced (or `within_blocks=False`, the zoo's presets) uses the units of its forward
chain.

Measured time is noisy: on a shared CPU a block's time moves by a few percent between runs, and
resnet18's best K=2 cuts (before `layer2.0` or `layer2.1`) differ by less than that. So `time`
measures each block several times (median, and the spread = interquartile range), and every
split whose predicted bottleneck is within the spread of the best one counts as a tie; among the
ties the FLOPs decide (the same cost model on FLOPs, backward = 2 forwards), then the position.
FLOPs do not depend on the machine's load, so two runs on one machine choose the same cut, while
a split that is better by more than the noise still wins (:func:`steady_cuts`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from ..errors import FrzooError
from .chain import block_list
from .costs import (median_and_spread, module_flops, sample_stages, sample_units, stage_memory,
                    unit_flops, unit_memory)
from .fx import fx_partition
from .fx_parts import build_fx_parts
from .profile import Block, profile_blocks

REPEATS = 5  # measurements per block for split.auto=time, after a warm-up run


class AlgorithmCosts(Protocol):
    """What balancing asks of an algorithm class (frzoo.algorithms.base.PartAlgorithm)."""

    @classmethod
    def part_cost(cls, index: int, num_parts: int, forward: float, backward: float) -> float: ...

    @classmethod
    def memory_cost(cls, index: int, num_parts: int, *, weights: float, saved: float,
                    input_bytes: float) -> float: ...


def units_of(model: nn.Module) -> List[List[str]]:
    """The cuttable units: the stem joins the first block, the head joins the last."""
    stem, blocks, head = block_list(model)
    if not blocks:
        return [stem + head]
    units = [[b] for b in blocks]
    units[0] = stem + units[0]
    units[-1] = units[-1] + head
    return units


def part_cost(costs: Sequence[Tuple[float, float]], index: int, num_parts: int,
              algorithm: AlgorithmCosts) -> float:
    """Work of part `index` per iteration from its units' (forward, backward + update) costs,
    as `algorithm` spends them."""
    forward = sum(f for f, _ in costs)
    backward = sum(b for _, b in costs)
    return algorithm.part_cost(index, num_parts, forward, backward)


def memory_cost(rows: Sequence[Tuple[float, float, float]], index: int, num_parts: int,
                algorithm: AlgorithmCosts) -> float:
    """Bytes part `index` keeps alive, from its units' (saved, input, parameter) bytes: the
    parameters and a momentum buffer each, its activations, and what `algorithm` holds more."""
    return algorithm.memory_cost(index, num_parts, weights=2 * sum(r[2] for r in rows),
                                 saved=sum(r[0] for r in rows), input_bytes=rows[0][1])


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


@dataclass
class Balance:
    """What `split.auto` chose and predicts: the points, and per part its cost in the measure
    (`unit`: s, FLOPs, params or bytes) under the algorithm's cost model, with the measured spread
    of that cost (0 for the measures that are counted, not timed)."""
    points: List[str]
    costs: List[float]
    spreads: List[float] = field(default_factory=list)
    unit: str = ""
    tie_broken: bool = False  # the fastest split by the medians lost a near-tie on FLOPs

    def describe(self) -> str:
        """One line for the run's first lines: each part's predicted share of the bottleneck
        and of the total, and how the noise was handled."""
        if len(self.costs) < 2:
            return "one part: nothing to balance"
        line = predicted_shares(self.costs)
        bottleneck = max(self.costs) if self.costs else 0.0
        if self.spreads and bottleneck > 0 and any(self.spreads):
            line += (f"; measured spread up to {100 * max(self.spreads) / bottleneck:.1f}% of the "
                     f"bottleneck, splits within it are ties broken by FLOPs"
                     + (" (which changed the pick)" if self.tie_broken else ""))
        return line


def predicted_shares(costs: Sequence[float]) -> str:
    """`part 1 100% of the bottleneck (52% of the total), part 2 ...` for per-part costs."""
    bottleneck, total = max(costs, default=0.0) or 1.0, sum(costs) or 1.0
    return ", ".join(f"part {k + 1} {100 * c / bottleneck:.0f}% of the bottleneck "
                     f"({100 * c / total:.0f}% of the total)" for k, c in enumerate(costs))


def split_costs(costs: Sequence[Tuple[float, float]], cuts: Sequence[int], k: int,
                algorithm: AlgorithmCosts) -> List[float]:
    """Each part's cost for the split at `cuts` (indices where parts 2..K start)."""
    bounds = [0, *cuts, len(costs)]
    return [part_cost(costs[a:b], i, k, algorithm) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def steady_cuts(times: Sequence[Tuple[float, float]], spreads: Sequence[Tuple[float, float]],
                flops: Sequence[float], k: int, algorithm: AlgorithmCosts) -> List[int]:
    """The split with the smallest measured bottleneck, where near-ties go to FLOPs.

    `times` and `spreads` are each unit's median (forward, backward) seconds and their spread,
    `flops` its forward FLOPs. A split's bottleneck counts as tied with the best one's when it is
    within the measured spread of the best split's parts (each part's spread under the cost
    model, added up; the largest of them: the amount by which the best bottleneck itself may be
    off). Added up, not in quadrature as independent errors: on resnet18's traced candidates, a
    convolution apart, the tighter quadrature let the pick alternate between two neighbouring
    cuts from run to run (docs/partitioning.md).
    Among the ties the one whose FLOPs bottleneck (same cost model, backward = 2 forwards) is
    smallest wins; equal FLOPs go to the first in the search's order. Both are exact
    minimisations by :func:`best_cuts`: the ties are the splits whose every part costs at most
    the limit."""
    n = len(times)
    fastest = best_cuts(n, k, lambda a, b, i: part_cost(times[a:b], i, k, algorithm))
    bottleneck = max(split_costs(times, fastest, k, algorithm))
    tolerance = max(split_costs(spreads, fastest, k, algorithm))
    if tolerance <= 0:
        return fastest
    by_flops = [(f, 2 * f) for f in flops]

    def cost(a: int, b: int, index: int) -> float:
        within = part_cost(times[a:b], index, k, algorithm) - bottleneck < tolerance
        return part_cost(by_flops[a:b], index, k, algorithm) if within else float("inf")

    return best_cuts(n, k, cost)


def _by_time(medians: Sequence[Tuple[float, float]], spreads: Sequence[Tuple[float, float]],
             flops: Sequence[float], k: int, algorithm: AlgorithmCosts) -> Tuple[List[int], Balance]:
    """The steady split of measured units (:func:`steady_cuts`) and its Balance, points to fill."""
    cuts = steady_cuts(medians, spreads, flops, k, algorithm)
    fastest = best_cuts(len(medians), k, lambda a, b, i: part_cost(medians[a:b], i, k, algorithm))
    return cuts, Balance([], split_costs(medians, cuts, k, algorithm),
                         split_costs(spreads, cuts, k, algorithm), "s", cuts != fastest)


def balanced_points(model: nn.Module, k: int, *, by: str, algorithm: AlgorithmCosts,
                    sample: torch.Tensor, within_blocks: bool = True) -> Tuple[List[str], List[float]]:
    """Split points for K parts balanced by `by` (time, flops, params or memory) under
    `algorithm` (its class, e.g. ``ALGORITHMS.get("fr")``), and each part's cost in that measure
    (seconds, FLOPs per sample, parameters, bytes); :func:`balance` says more."""
    chosen = balance(model, k, by=by, algorithm=algorithm, sample=sample,
                     within_blocks=within_blocks)
    return chosen.points, chosen.costs


def balance(model: nn.Module, k: int, *, by: str, algorithm: AlgorithmCosts,
            sample: torch.Tensor, within_blocks: bool = True) -> Balance:
    """Split points for K parts balanced by `by` under `algorithm`, with each part's predicted
    cost (and for `time` its measured spread), see :class:`Balance`. Every measure but `params`
    runs over the traced candidates where the model can be traced (`params` where the chain has
    fewer than K units: parameters sit in blocks, a finer cut gains nothing). `within_blocks=False`
    keeps them on the units of the forward chain (cuts between blocks, one tensor each: the zoo's
    presets)."""
    if k == 1:  # nothing to choose: measuring would only print a meaningless spread
        return Balance(points=[], costs=[], unit=by)
    units = units_of(model)
    if within_blocks or len(units) < k:
        blocks = _traced_blocks(model, sample[:1]) if by != "params" or len(units) < k else None
        if blocks is not None and by in ("flops", "params"):
            return _balance_blocks(blocks, k, by, algorithm)
        if blocks is not None:
            measured = _measure_blocks(model, blocks, k, by, algorithm, sample)
            if measured is not None:
                return measured
    if len(units) < k:
        raise FrzooError(f"cannot balance {type(model).__name__} into K={k} parts by {by}: its "
                         f"forward chain has {len(units)} units and no split of its traced "
                         f"forward could be measured; use K <= {len(units)} or give split.points.")
    if by == "time":
        medians, spreads = zip(*(median_and_spread(rows)
                                 for rows in sample_units(model, units, sample, REPEATS)))
        cuts, chosen = _by_time(medians, spreads, unit_flops(model, units, sample[:1]), k,
                                algorithm)
        chosen.points = [units[c][0] for c in cuts]
        return chosen
    if by == "flops":  # a backward costs about two forwards
        costs = [(f, 2 * f) for f in unit_flops(model, units, sample[:1])]

        def cost(a: int, b: int, index: int) -> float:
            return part_cost(costs[a:b], index, k, algorithm)
    elif by == "params":
        counts = [float(sum(p.numel() for n in unit for p in model.get_submodule(n).parameters()))
                  for unit in units]

        def cost(a: int, b: int, index: int) -> float:
            return sum(counts[a:b])
    else:  # memory: the schema admits no other split.auto (frzoo.config)
        rows = unit_memory(model, units, sample)

        def cost(a: int, b: int, index: int) -> float:
            return memory_cost(rows[a:b], index, k, algorithm)

    cuts = best_cuts(len(units), k, cost)
    bounds = [0, *cuts, len(units)]
    shares = [cost(a, b, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    unit = {"flops": "FLOPs", "params": "params", "memory": "bytes"}[by]
    return Balance([units[c][0] for c in cuts], shares, [0.0] * len(shares), unit)


def flops_shares(model: nn.Module, names: Sequence[Sequence[str]], sample: torch.Tensor,
                 algorithm: AlgorithmCosts) -> List[float]:
    """Each part's predicted cost per iteration under `algorithm`'s cost model from FLOPs
    (backward = 2 forwards), for parts given as module names (a partition): what `frzoo plan`
    prints for any split. FLOPs outside the listed modules (functional code of the root) are
    charged to the last part, which holds the head."""
    per_module: Dict[str, float] = module_flops(model, sample[:1])
    forward = [sum(per_module.get(n, 0.0) for n in part) for part in names]
    if forward:
        forward[-1] += max(0.0, per_module.get("", 0.0) - sum(forward))
    return [algorithm.part_cost(i, len(forward), f, 2 * f) for i, f in enumerate(forward)]


def _traced_blocks(model: nn.Module, sample: torch.Tensor) -> Optional[List[Block]]:
    """The candidates of the traced forward measured on one sample; None where it cannot be
    traced (the chain's units are then all there is)."""
    try:
        return profile_blocks(model, sample)
    except FrzooError:
        return None


def _lightest(cuts: Sequence[int], blocks: Sequence[Block], weights: Sequence[float],
             stay: bool = False) -> List[int]:
    """Each cut moved, across blocks that cost nothing (norms, activations), to where the fewest
    bytes cross: the same part costs, less to send and to keep (resnet18 at K=2 by FLOPs:
    `layer2.1`, one tensor, rather than the equally balanced `layer2.0.downsample.1`, two).
    With `stay` a cut moves only where strictly fewer bytes cross (measured costs: a norm costs
    time, though no FLOPs)."""
    out: List[int] = []
    for n, cut in enumerate(cuts):
        low = out[-1] + 1 if out else 1
        high = cuts[n + 1] - 1 if n + 1 < len(cuts) else len(blocks) - 1
        options = [cut]
        j = cut - 1
        while j >= low and weights[j] == 0:  # block j would join the next part
            options.append(j)
            j -= 1
        j = cut
        while j + 1 <= high and weights[j] == 0:  # block j would join the previous part
            options.append(j + 1)
            j += 1
        # fewest bytes, then the most readable name (the shallowest module), then the earliest
        out.append(min(options, key=lambda i: (blocks[i].input_bytes, stay and i != cut,
                                               blocks[i].point.count("."), i)))
    return out


def _balance_blocks(blocks: Sequence[Block], k: int, by: str,
                    algorithm: AlgorithmCosts) -> Balance:
    """best_cuts over the traced candidates: FLOPs per sample (a backward costs about two
    forwards) under `algorithm`'s cost model, or parameters."""
    weights = [float(b.flops if by == "flops" else b.params) for b in blocks]
    if by == "flops":
        costs = [(f, 2.0 * f) for f in weights]

        def cost(a: int, b: int, index: int) -> float:
            return part_cost(costs[a:b], index, k, algorithm)
    else:
        def cost(a: int, b: int, index: int) -> float:
            return sum(weights[a:b])
    cuts = _lightest(best_cuts(len(blocks), k, cost), blocks, weights)
    bounds = [0, *cuts, len(blocks)]
    shares = [cost(a, b, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return Balance([blocks[c].point for c in cuts], shares, [0.0] * len(shares),
                   "FLOPs" if by == "flops" else "params")


def _measure_blocks(model: nn.Module, blocks: Sequence[Block], k: int, by: str,
                    algorithm: AlgorithmCosts, sample: torch.Tensor) -> Optional[Balance]:
    """`time` or `memory` over the traced candidates: each stretch from a candidate holding
    FLOPs to the next one (a convolution or matrix product with the norms and activations after
    it) is built as a part of the traced forward and measured on `sample` as the parts would
    run; cuts then move across stretches without FLOPs only where fewer bytes cross. None where
    the stretches cannot be built together (the chain's units are then used)."""
    starts = [0] + [j for j in range(1, len(blocks)) if blocks[j].flops > 0]
    if len(starts) < k:
        return None
    try:
        stages = build_fx_parts(model, fx_partition(model, [blocks[j].point for j in starts[1:]]))
    except FrzooError:
        return None
    flops = [float(sum(b.flops for b in blocks[a:z]))
             for a, z in zip(starts, [*starts[1:], len(blocks)])]
    was_training = model.training
    try:
        if by == "time":
            model.train()
            medians, spreads = zip(*(median_and_spread(rows)
                                     for rows in sample_stages(stages, sample, REPEATS)))
            cuts, chosen = _by_time(medians, spreads, flops, k, algorithm)
        else:
            rows = stage_memory(stages, sample)
            cuts = best_cuts(len(stages), k,
                             lambda a, b, i: memory_cost(rows[a:b], i, k, algorithm))
            bounds = [0, *cuts, len(stages)]
            chosen = Balance([], [memory_cost(rows[a:b], i, k, algorithm)
                                  for i, (a, b) in enumerate(zip(bounds, bounds[1:]))],
                             [0.0] * k, "bytes")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    moved = _lightest([starts[c] for c in cuts], blocks, [b.flops for b in blocks], stay=True)
    chosen.points = [blocks[j].point for j in moved]
    return chosen
