"""split.auto: exact search over contiguous splits, and the algorithm's cost model."""
from __future__ import annotations

import itertools

import pytest
import timm
import torch

from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.config import load_recipe
from frzoo.errors import RecipeError
from frzoo.split import balanced_points
from frzoo.split.balance import best_cuts, memory_cost, part_cost, units_of

ALGORITHMS = {"fr": FeaturesReplay, "bp": Backprop}


def brute_force(costs, k, algorithm):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        value = max(part_cost(costs[a:b], i, k, algorithm)
                    for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
        if best is None or value < best[0]:
            best = (value, list(cuts))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["fr", "bp"])
def test_dynamic_programming_matches_exhaustive_search(seed, k, algorithm):
    algorithm = ALGORITHMS[algorithm]
    g = torch.Generator().manual_seed(seed)
    costs = [(float(f), float(b)) for f, b in torch.rand(9, 2, generator=g)]
    cuts = best_cuts(len(costs), k, lambda a, b, i: part_cost(costs[a:b], i, k, algorithm))
    bounds = [0, *cuts, len(costs)]
    value = max(part_cost(costs[a:b], i, k, algorithm)
                for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
    assert value == pytest.approx(brute_force(costs, k, algorithm)[0])


def test_fr_gives_the_last_part_more_blocks_than_bp():
    costs = [(1.0, 2.0)] * 12  # identical blocks, B = 2F
    fr = best_cuts(12, 2, lambda a, b, i: part_cost(costs[a:b], i, 2, FeaturesReplay))
    bp = best_cuts(12, 2, lambda a, b, i: part_cost(costs[a:b], i, 2, Backprop))
    assert bp == [6]
    assert fr == [5]  # part 1 costs 4F per block, part 2 3F: 5 * 4 = 20 vs 7 * 3 = 21


def test_balanced_points_on_a_real_model():
    model = timm.create_model("resnet18", num_classes=10)
    assert units_of(model)[0][:4] == ["conv1", "bn1", "act1", "maxpool"]
    points, costs = balanced_points(model, 2, by="params", algorithm=FeaturesReplay,
                                    sample=torch.randn(2, 3, 32, 32))
    assert points == ["layer4.1"] and len(costs) == 2  # layer4 holds most parameters
    points, costs = balanced_points(model, 3, by="time", algorithm=FeaturesReplay,
                                    sample=torch.randn(8, 3, 32, 32))
    assert len(points) == 2 and all(c > 0 for c in costs)


def test_auto_needs_k_and_excludes_points():
    with pytest.raises(RecipeError, match="needs the number of parts"):
        load_recipe(None, ["model.name=x", "split.auto=time"])
    with pytest.raises(RecipeError, match="remove split.points"):
        load_recipe(None, ["model.name=x", "split.auto=time", "split.points=[a]"])
    cfg = load_recipe(None, ["model.name=x", "split.auto=time", "split.k=3"])
    assert cfg.split.k == 3


def test_flops_and_memory_measures():
    model = timm.create_model("resnet18", num_classes=10)
    sample = torch.randn(4, 3, 32, 32)
    points, flops = balanced_points(model, 2, by="flops", algorithm=FeaturesReplay, sample=sample)
    assert len(points) == 1 and all(f > 0 for f in flops)
    # memory: fr's first part pays for its history, so fr puts the cut earlier than bp
    fr_points, fr_bytes = balanced_points(model, 4, by="memory", algorithm=FeaturesReplay,
                                          sample=sample)
    bp_points, _ = balanced_points(model, 4, by="memory", algorithm=Backprop, sample=sample)
    from frzoo.split.balance import _traced_blocks  # memory balances over the traced candidates
    candidates = [b.point for b in _traced_blocks(model, sample[:1])]
    assert candidates.index(fr_points[0]) <= candidates.index(bp_points[0])
    assert len(fr_bytes) == 4


def test_each_algorithm_states_its_own_costs():
    # time: fr plays, replays and backpropagates (2F + B) except in the last part; bp and ddg F + B
    costs = [(1.0, 2.0), (3.0, 5.0)]
    assert part_cost(costs, 0, 3, FeaturesReplay) == 2 * 4 + 7
    assert part_cost(costs, 2, 3, FeaturesReplay) == 4 + 7
    assert part_cost(costs, 0, 3, Backprop) == part_cost(costs, 0, 3, DecoupledBackprop) == 4 + 7
    # memory, per unit (saved, input, parameter bytes): parameters and momentum, one graph, and
    # fr K-k more inputs (its history), ddg K-k more graphs and inputs
    rows = [(10.0, 3.0, 1.0), (20.0, 5.0, 2.0)]
    assert memory_cost(rows, 0, 3, Backprop) == 6 + 30
    assert memory_cost(rows, 0, 3, FeaturesReplay) == 6 + 30 + 2 * 3
    assert memory_cost(rows, 0, 3, DecoupledBackprop) == 6 + 3 * 30 + 2 * 3
    assert memory_cost(rows, 2, 3, DecoupledBackprop) == memory_cost(rows, 2, 3, Backprop)


# split.auto=time holds still: near-ties (within the measured spread) go to FLOPs, then position.
# Seven units with B = 2F, so under fr K=2 part 1 costs 4F and part 2 3F: the cuts before units
# 3 and 4 predict bottlenecks 101.7 and 102.4 (0.7% apart), every other cut is > 20% worse.
NEAR_TIE_F = [10.0, 8.0, 7.0, 0.6, 11.0, 11.0, 11.3]


def noisy_draw(g, true, noise):
    """Measured medians: each unit's forward and backward off by up to +-`noise` (relative)."""
    factors = 1 + (2 * torch.rand(len(true), 2, generator=g) - 1) * noise
    return [(f * float(a), b * float(c)) for (f, b), (a, c) in zip(true, factors)]


def test_near_ties_go_to_flops_so_noisy_measurements_choose_the_same_cut():
    from frzoo.split.balance import steady_cuts
    true = [(f, 2 * f) for f in NEAR_TIE_F]
    spreads = [(0.08 * f, 0.08 * b) for f, b in true]  # what the measurements' IQR says
    g = torch.Generator().manual_seed(0)
    fastest, steady = set(), set()
    for _ in range(50):
        medians = noisy_draw(g, true, 0.04)
        fastest.add(tuple(best_cuts(7, 2, lambda a, b, i: part_cost(medians[a:b], i, 2, FeaturesReplay))))
        steady.add(tuple(steady_cuts(medians, spreads, NEAR_TIE_F, 2, FeaturesReplay)))
    assert fastest == {(3,), (4,)}  # the medians alone flip with the noise
    assert steady == {(3,)}  # the smaller FLOPs bottleneck: 4 * 25 = 100 < 3 * 33.9 = 101.7
    # equal FLOPs: the position decides, the same way every time
    flat = [1.0] * 7
    assert len({tuple(steady_cuts(noisy_draw(g, true, 0.04), spreads, flat, 2, FeaturesReplay))
                for _ in range(20)}) == 1


def test_a_split_better_by_more_than_the_spread_still_wins():
    from frzoo.split.balance import steady_cuts
    times = [(f, 2 * f) for f in [10.0, 8.0, 7.0, 9.0, 11.0, 11.0, 11.3]]
    flops = [10.0, 8.0, 7.0, 0.6, 11.0, 11.0, 20.0]  # FLOPs alone would cut before unit 4
    assert best_cuts(7, 2, lambda a, b, i: part_cost([(f, 2 * f) for f in flops][a:b], i, 2,
                                                     FeaturesReplay)) == [4]
    # by time the cut before unit 3 (126.9) beats the one before unit 4 (136) by far more than
    # a 2% spread: time decides; with a spread wider than the gap, FLOPs do
    tight = [(0.02 * f, 0.02 * b) for f, b in times]
    assert steady_cuts(times, tight, flops, 2, FeaturesReplay) == [3]
    wide = [(0.5 * f, 0.5 * b) for f, b in times]
    assert steady_cuts(times, wide, flops, 2, FeaturesReplay) == [4]
    # no spread measured (one measurement): the medians decide alone
    assert steady_cuts(times, [(0.0, 0.0)] * 7, flops, 2, FeaturesReplay) == [3]


def test_median_and_interquartile_spread_ignore_an_outlier():
    from frzoo.split.costs import median_and_spread
    rows = [(1.0, 5.0), (1.1, 5.2), (0.9, 25.0), (1.0, 4.9), (1.2, 5.1)]  # one 5x backward
    (f, b), (sf, sb) = median_and_spread(rows)
    assert (f, b) == (1.0, 5.1)
    assert sf == pytest.approx(0.1) and sb == pytest.approx(0.2)


def test_time_balance_measures_each_block_several_times_and_reports_shares():
    from frzoo.split import balance
    from frzoo.split.balance import REPEATS, predicted_shares
    from frzoo.split.costs import sample_units
    model = timm.create_model("resnet18", num_classes=10)
    sample = torch.randn(4, 3, 32, 32)
    rows = sample_units(model, units_of(model), sample, REPEATS)
    assert REPEATS >= 3 and all(len(r) == REPEATS for r in rows)
    chosen = balance(model, 2, by="time", algorithm=FeaturesReplay, sample=sample)
    assert len(chosen.points) == 1 and len(chosen.costs) == len(chosen.spreads) == 2
    assert chosen.unit == "s" and "of the bottleneck" in chosen.describe()
    assert predicted_shares([3.0, 1.0]) == ("part 1 100% of the bottleneck (75% of the total), "
                                            "part 2 33% of the bottleneck (25% of the total)")


def test_flops_shares_of_any_partition_use_the_algorithm_cost_model():
    from frzoo.split import flops_shares
    model = timm.create_model("resnet18", num_classes=10)
    sample = torch.randn(1, 3, 32, 32)
    units = units_of(model)
    per_unit = unit_flops_of(model, units, sample)
    parts = [sum(units[:3], []), sum(units[3:], [])]
    fr = flops_shares(model, parts, sample, FeaturesReplay)
    assert fr == pytest.approx([4 * sum(per_unit[:3]), 3 * sum(per_unit[3:])])
    assert flops_shares(model, [[""]], sample, Backprop) == pytest.approx([3 * sum(per_unit)])


def unit_flops_of(model, units, sample):
    from frzoo.split.costs import unit_flops
    return unit_flops(model, units, sample)

def test_flops_balance_runs_over_traced_candidates_for_any_traceable_model():
    """split.auto=flops balances over the traced candidates (cuts inside residual blocks too):
    never worse than over blocks, resnet18's K=2 parts within 4% of each other under fr's cost
    model (a 3x3 convolution is about 6% of its FLOPs: no cut between operations does better),
    and a RegNet, whose stages are not Sequential, splits by K alone."""
    from frzoo.split import points_for_k, resolve
    sample = torch.randn(2, 3, 32, 32)
    model = timm.create_model("resnet18", num_classes=10)
    points, costs = balanced_points(model, 2, by="flops", algorithm=FeaturesReplay, sample=sample)
    _, between = balanced_points(model, 2, by="flops", algorithm=FeaturesReplay, sample=sample,
                                 within_blocks=False)
    assert max(costs) / min(costs) < 1.04 and max(costs) <= max(between)
    # equally balanced cuts across blocks that cost nothing: the one sending the fewest bytes
    # (one tensor between blocks, not the skip and the branch before layer2.0.downsample.1)
    assert points == ["layer2.1"]
    assert resolve(model, points=points, sample=sample).report.exact
    regnet = timm.create_model("regnetx_002", num_classes=10)
    for found in (balanced_points(regnet, 3, by="flops", algorithm=FeaturesReplay,
                                  sample=sample)[0], points_for_k(regnet, 3)):
        assert len(found) == 2
        assert resolve(regnet, points=found, sample=sample).report.exact


def test_time_and_memory_balance_over_traced_candidates():
    """split.auto=time and memory measure stretches of the traced forward (cuts inside residual
    blocks too, several tensors crossing) and so split models whose chain has too few blocks;
    the points they give build parts that compute what the model computes."""
    from frzoo.split import balance, resolve
    from frzoo.split.balance import _traced_blocks
    sample = torch.randn(4, 3, 32, 32)
    regnet = timm.create_model("regnetx_002", num_classes=10)
    for by in ("time", "memory"):
        chosen = balance(regnet, 3, by=by, algorithm=FeaturesReplay, sample=sample)
        assert len(chosen.points) == 2 and len(chosen.costs) == 3 and min(chosen.costs) > 0
        assert resolve(regnet, points=chosen.points, sample=sample).report.exact
    model = timm.create_model("resnet18", num_classes=10)
    candidates = [b.point for b in _traced_blocks(model, sample[:1])]
    chosen = balance(model, 4, by="time", algorithm=FeaturesReplay, sample=sample)
    assert chosen.unit == "s" and set(chosen.points) <= set(candidates)
    assert resolve(model, points=chosen.points, sample=sample).report.exact


def test_one_part_has_nothing_to_balance_and_says_so():
    """split.auto at K=1 measures nothing and prints no spread (there is no split to choose)."""
    from frzoo.split import balance
    model = timm.create_model("resnet18", num_classes=10)
    for by in ("time", "flops", "memory", "params"):
        chosen = balance(model, 1, by=by, algorithm=FeaturesReplay,
                         sample=torch.randn(2, 3, 32, 32))
        assert chosen.points == [] and chosen.describe() == "one part: nothing to balance"
