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
    units = [u[0] for u in units_of(model)]
    assert units.index(fr_points[0]) <= units.index(bp_points[0])
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
