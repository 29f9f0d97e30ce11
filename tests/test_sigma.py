"""Sigma, the sufficient direction constant, measured per part against true backprop."""
from __future__ import annotations

import json

import pytest
from test_engine import assert_same_weights, batches, make_executor, tiny_model

from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.config import load_recipe
from frzoo.errors import RecipeError
from frzoo.trainer import train


def sigmas(k: int, lr: float, cls=FeaturesReplay, dropout: float = 0.0):
    ex = make_executor(tiny_model(dropout), k, cls, lr=lr)
    ex.measure_sigma(1)
    for t, (x, y) in enumerate(batches(8)):
        ex.train_step((x, y), t)
    return [ex.sigma.read(i) for i in range(k)]


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


def test_the_probe_does_not_change_training():
    data = batches(6)
    probed, plain = tiny_model(), tiny_model()
    ex = make_executor(probed, 3, FeaturesReplay)
    ex.measure_sigma(1)
    for t, (x, y) in enumerate(data):
        ex.train_step((x, y), t)
    ex2 = make_executor(plain, 3, FeaturesReplay)
    for t, (x, y) in enumerate(data):
        ex2.train_step((x, y), t)
    assert_same_weights(probed, plain)


def test_sigma_in_metrics(tmp_path):
    cfg = load_recipe(None, ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48",
                             "data.num_test=8", "data.batch_size=8", "data.image_size=16",
                             "split.points=[layer2,layer4]", "train.max_steps=6", "train.log_every=3",
                             "train.sigma_every=1", "train.progress=false", f"run.out_dir={tmp_path}"])
    train(cfg, tmp_path, echo=lambda *_: None)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["part3/sigma"] == 1.0 and last["part1/sigma"] > 0
    with pytest.raises(RecipeError, match="executor=local"):
        load_recipe(None, ["model.name=x", "train.sigma_every=5", "executor=distributed"])
