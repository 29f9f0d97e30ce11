"""Recipes: typed schema, `_base_` inheritance, precedence, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from frzoo.config import load_recipe, recipe_diff, to_container
from frzoo.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_cli_over_recipe_over_base_over_defaults(tmp_path):
    write(tmp_path / "base.yaml", "model: {name: resnet18}\noptimizer: {lr: 0.1, momentum: 0.5}\n")
    recipe = write(tmp_path / "r.yaml", "_base_: base.yaml\noptimizer: {lr: 0.2}\n")
    cfg = load_recipe(recipe, ["optimizer.lr=0.3"])
    assert cfg.optimizer.lr == 0.3  # CLI
    assert cfg.optimizer.momentum == 0.5  # base
    assert cfg.model.name == "resnet18"  # base
    assert cfg.optimizer.weight_decay == 5e-4  # schema default
    cfg = load_recipe(recipe)
    assert cfg.optimizer.lr == 0.2  # recipe over base


def test_unknown_key_names_the_path_and_suggests(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model: {name: resnet18}\noptimizer: {lrr: 0.1}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'optimizer.lrr'.*Did you mean 'optimizer.lr'"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"unknown key 'train.epoch'.*'train.epochs'"):
        load_recipe(None, ["model.name=x", "train.epoch=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"bad value for 'train.epochs'"):
        load_recipe(None, ["model.name=x", "train.epochs=many"])


def test_choices_are_checked_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"algorithm.warmup='zero' is not one of skip, zeros.*'zeros'"):
        load_recipe(None, ["model.name=x", "algorithm.warmup=zero"])
    with pytest.raises(RecipeError, match=r"data.batch_size=0 must be positive"):
        load_recipe(None, ["model.name=x", "data.batch_size=0"])


def test_missing_model_name():
    with pytest.raises(RecipeError, match="model.name is required"):
        load_recipe(None, [])


def test_split_forms_are_exclusive():
    with pytest.raises(RecipeError, match="only one of points, parts or k"):
        load_recipe(None, ["model.name=x", "split.points=[layer2]", "split.k=2"])


def test_base_cycle_and_non_mapping(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(None, ["model.name=x", "optimizer.lr"])


def test_model_kwargs_take_any_keys():
    cfg = load_recipe(None, ["model.name=x", "model.kwargs.drop_rate=0.1", "model.kwargs.stem_type=deep"])
    assert dict(cfg.model.kwargs) == {"drop_rate": 0.1, "stem_type": "deep"}


@pytest.mark.parametrize("name", ["quickstart.yaml", "cifar10_resnet101.yaml", "cifar100_resnet101.yaml"])
def test_shipped_recipes_load(name):
    cfg = load_recipe(REPO / "recipes" / name)
    assert cfg.model.name


def test_paper_recipes_carry_the_paper_settings():
    cfg = load_recipe(REPO / "recipes" / "cifar100_resnet101.yaml")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.01, 0.9, 5e-4)
    assert cfg.data.batch_size == 128 and cfg.train.epochs == 300
    assert list(cfg.optimizer.schedule.milestones) == [150, 225] and cfg.optimizer.schedule.gamma == 0.1
    assert list(cfg.devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert cfg.data.name == "cifar100" and cfg.model.name == "cifar_resnet101"


def test_recipe_diff():
    a = to_container(load_recipe(None, ["model.name=x"]))
    b = to_container(load_recipe(None, ["model.name=x", "optimizer.lr=0.5"]))
    assert recipe_diff(a, b) == {"optimizer.lr": (0.01, 0.5)}
