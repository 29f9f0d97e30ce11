"""Sigma, the sufficient direction constant, measured per part against true backprop."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_engine import CUTS, assert_same_weights, batches, make_executor, tiny_model

from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.config import load_recipe
from frzoo.errors import RecipeError
from frzoo.run import train
from frzoo.sigma import SigmaProbe


def probed_step(ex, probe: SigmaProbe, x, y, t: int) -> None:
    """One step as the training loop runs it with train.sigma_every set."""
    probe.before_step(t, x, y)
    ex.train_step((x, y), t)


def sigmas(k: int, lr: float, cls=FeaturesReplay, dropout: float = 0.0):
    ex = make_executor(tiny_model(dropout), k, cls, lr=lr)
    probe = SigmaProbe(ex.algorithms, every=1)
    for t, (x, y) in enumerate(batches(8)):
        probed_step(ex, probe, x, y, t)
    return [probe.read(i) for i in range(k)]


def test_one_part_gives_sigma_one_exactly():
    assert sigmas(1, 0.05) == [1.0]


@pytest.mark.parametrize("cls", [FeaturesReplay, DecoupledBackprop])
def test_frozen_weights_give_sigma_one_for_every_part(cls):
    assert sigmas(3, 0.0, cls) == [1.0, 1.0, 1.0]


def test_frozen_weights_with_dropout_still_give_one():  # the probe replays the same masks
    assert sigmas(3, 0.0, dropout=0.5) == [1.0, 1.0, 1.0]


def test_training_gives_last_part_one_and_others_positive():
    values = sigmas(3, 0.05)
    assert values[2] == 1.0
    assert all(0 < v < 1 for v in values[:2])


def conv_linear_weights(modules) -> list:
    return [m.weight for m in modules if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def expected_sigma(model_at, x, y, ids, used) -> float:
    """sigma of one part from scratch: plain backprop of the whole model (a deep copy, so nothing
    is touched) on the part's sample, then <true, used> / ||true||^2 over its Conv/Linear weights."""
    model = copy.deepcopy(model_at)
    F.cross_entropy(model(x), y).backward()
    true = [w.grad for w in conv_linear_weights(m for i in ids for m in model[i].modules())]
    dot = sum(float((t.double() * u.double()).sum()) for t, u in zip(true, used))
    return dot / sum(float((t.double() ** 2).sum()) for t in true)


def test_sigma_is_measured_at_the_current_weights_on_the_part_s_own_sample():
    """At iteration t, part k's update is compared with the true gradient at w^t (every part's
    weights before iteration t updates anything) on sample t - staleness_k: recomputed here
    with plain backprop on copies of the model taken at w^t. Copies at w^{t-1} (stale) and
    w^{t+1} (after the update) give other values, which the probe must not match."""
    k = 3
    model = tiny_model()
    ex = make_executor(model, k, FeaturesReplay, lr=0.05)
    probe = SigmaProbe(ex.algorithms, every=1)
    used: dict = {}  # part -> the gradient its optimizer applied, read as it steps
    for i, algo in enumerate(ex.algorithms):
        def step(i=i, algo=algo, inner=algo.optimizer.step):
            used[i] = [w.grad.clone() for w in conv_linear_weights(algo.part.modules())]
            return inner()
        algo.optimizer.step = step
    data = batches(6)
    snapshots = [copy.deepcopy(model)]  # snapshots[t] = the model at w^t
    measured = []  # per iteration: sigma per part (None before a part's first update)
    for t, (x, y) in enumerate(data):
        used.clear()
        probed_step(ex, probe, x, y, t)
        snapshots.append(copy.deepcopy(model))
        measured.append(([probe.read(i) for i in range(k)], dict(used)))
    checked = 0
    for t in range(2, len(data) - 1):
        sigmas_t, used_t = measured[t]
        for i, ids in enumerate(CUTS[k]):
            sample = t - ex.algorithms[i].staleness
            x, y = data[sample]
            at = {w: expected_sigma(snapshots[w], x, y, ids, used_t[i]) for w in (t - 1, t, t + 1)}
            assert sigmas_t[i] == at[t], (t, i, sigmas_t[i], at)
            if i < k - 1:  # the last part's sigma is 1 at w^t; other weights give other values
                assert abs(at[t - 1] - at[t]) > 1e-6 and abs(at[t + 1] - at[t]) > 1e-6, (t, i)
            checked += 1
    assert checked == 3 * k
    assert measured[0][0] == [None, None, 1.0]  # parts 1 and 2 are still warming up


def test_the_probe_does_not_change_training():
    data = batches(6)
    probed, plain = tiny_model(), tiny_model()
    ex = make_executor(probed, 3, FeaturesReplay)
    probe = SigmaProbe(ex.algorithms, every=1)
    for t, (x, y) in enumerate(data):
        probed_step(ex, probe, x, y, t)
    ex2 = make_executor(plain, 3, FeaturesReplay)
    for t, (x, y) in enumerate(data):
        ex2.train_step((x, y), t)
    assert_same_weights(probed, plain)


def test_sigma_in_metrics(tmp_path):
    cfg = load_recipe(None, ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48",
                             "data.num_test=8", "data.batch_size=8", "data.image_size=16",
                             "split.points=[layer2,layer4]", "train.max_steps=6", "train.log_every=3",
                             "train.sigma_every=1", "train.progress=false", f"run.out_dir={tmp_path}"])
    train(cfg, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["part3/sigma"] == 1.0 and last["part1/sigma"] > 0
    with pytest.raises(RecipeError, match="executor=local"):
        load_recipe(None, ["model.name=x", "train.sigma_every=5", "executor=distributed"])
