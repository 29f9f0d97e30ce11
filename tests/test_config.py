"""Recipes: typed schema, `_base_` inheritance, precedence, and errors that name the key."""
from __future__ import annotations

import re

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from frzoo.algorithms.options import describe_options, parse_options
from frzoo.pipeline import resolve_algorithm
from frzoo.rules import positive
from frzoo.cli import main
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
    with pytest.raises(RecipeError, match=r"optimizer.name='sgdd' is not one of sgd, adamw.*'sgd'"):
        load_recipe(None, ["model.name=x", "optimizer.name=sgdd"])
    with pytest.raises(RecipeError, match=r"data.batch_size=0 must be positive"):
        load_recipe(None, ["model.name=x", "data.batch_size=0"])


def algorithm_section(*overrides: str) -> dict:
    """The `algorithm:` section as the run gets it: checked and completed by its class."""
    return dict(resolve_algorithm(load_recipe(None, ["model.name=x", *overrides])).algorithm)


def owners(option: str) -> str:
    """The registered algorithms that take `option`, as the messages list them: fr and ddg, and
    the plugin algorithms other tests of the same process (an xdist worker) registered."""
    from frzoo.algorithms.options import declared_options
    from frzoo.plugins import ALGORITHMS
    return ", ".join(sorted(n for n in ALGORITHMS.names()
                            if option in declared_options(ALGORITHMS.get(n))))


def test_algorithm_options_are_declared_and_checked_by_the_algorithm_class():
    # each class fills in the defaults of the options it takes, and only those
    assert algorithm_section() == {"name": "fr", "warmup": "skip", "replay_bn": "once"}
    assert algorithm_section("algorithm.name=ddg") == {"name": "ddg", "warmup": "skip"}
    assert algorithm_section("algorithm.name=bp") == {"name": "bp"}
    assert algorithm_section("algorithm.replay_bn=twice", "algorithm.warmup=zeros") == \
        {"name": "fr", "warmup": "zeros", "replay_bn": "twice"}
    # an option no registered algorithm takes is an error naming the class and what it takes,
    # with the closest option of this algorithm or, failing that, of another one
    with pytest.raises(RecipeError, match=r"^algorithm 'ddg' \(DecoupledBackprop\) takes no option "
                                          r"'replay'; its options: warmup \(skip\|zeros, "
                                          r"default skip\)\. Did you mean 'replay_bn' \(an option "
                                          rf"of {re.escape(owners('replay_bn'))}\)\? No other "
                                          r"registered algorithm takes it either\. Remove "
                                          r"algorithm\.replay from the recipe"):
        algorithm_section("algorithm.name=ddg", "algorithm.replay=twice")
    with pytest.raises(RecipeError, match=r"algorithm 'bp' \(Backprop\) takes no option 'warmpu'; "
                                          r"its options: none\. Did you mean 'warmup' \(an option "
                                          rf"of {re.escape(owners('warmup'))}\)\?"):
        algorithm_section("algorithm.name=bp", "algorithm.warmpu=skip")
    with pytest.raises(RecipeError, match=r"takes no option 'replay_b'.*Did you mean 'replay_bn'"):
        algorithm_section("algorithm.replay_b=twice")
    # a bad choice names the option, the value and the valid ones; types count (1 is not 'skip')
    with pytest.raises(RecipeError, match=r"algorithm.warmup='zero' is not one of skip, zeros "
                                          r"\(algorithm 'fr' \(FeaturesReplay\)\)\. Did you mean 'zeros'"):
        algorithm_section("algorithm.warmup=zero")
    with pytest.raises(RecipeError, match=r"algorithm.replay_bn=2 is not one of once, twice"):
        algorithm_section("algorithm.replay_bn=2")
    with pytest.raises(RecipeError, match=r"algorithm.name=None must be the name of an algorithm"):
        load_recipe(None, ["model.name=x", "algorithm.name=null"])


def test_options_are_typed_by_omegaconf_as_every_section():
    """The refusals of an algorithm's Options: a bool for an int, a required option missing, a
    range beside the field, the class's own __post_init__ rule, and the frozen object it gives."""
    @dataclass(frozen=True)
    class Options:
        steps: int
        scale: float = positive(1.0)
        note: Optional[str] = None

        def __post_init__(self) -> None:
            if self.steps > 10 and self.scale > 1:
                raise ValueError(f"steps={self.steps} needs scale <= 1")

    cls = type("Custom", (), {"Options": Options})
    options = parse_options(cls, {"steps": 3, "scale": 2}, "custom")
    assert options == Options(steps=3, scale=2.0, note=None) and isinstance(options.scale, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 4  # type: ignore[misc]
    for given, says in (({"steps": True}, r"^algorithm.steps=True must be of type int \(algorithm "
                                          r"'custom' \(Custom\)\)\.$"),
                        ({}, r"^algorithm 'custom' \(Custom\) needs the option algorithm.steps "
                             r"\(int\)\.$"),
                        ({"steps": 1, "scale": -1}, r"^algorithm.scale=-1.0 must be positive"),
                        ({"steps": 11, "scale": 2}, r"^algorithm 'custom' \(Custom\): steps=11 "
                                                    r"needs scale <= 1$")):
        with pytest.raises(RecipeError, match=says):
            parse_options(cls, given, "custom")
    assert describe_options(cls) == ("steps (int, required), scale (float, default 1.0), "
                                     "note (str or null, default None)")


def test_another_algorithms_options_are_dropped_with_a_one_line_note(caplog):
    # bp takes no option: fr's (and ddg's) `warmup` is set aside, named in one line, and the
    # section the run records holds exactly what bp uses
    with caplog.at_level("WARNING", logger="frzoo"):
        assert algorithm_section("algorithm.name=bp", "algorithm.warmup=zeros",
                                 "algorithm.replay_bn=twice") == {"name": "bp"}
    assert [r.getMessage() for r in caplog.records] == [
        f"algorithm 'bp' (Backprop) ignores options of other algorithms: algorithm.warmup (of "
        f"{owners('warmup')}); algorithm.replay_bn (of {owners('replay_bn')}). Its options: none."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="frzoo"):
        assert algorithm_section("algorithm.name=ddg", "algorithm.warmup=zeros",
                                 "algorithm.replay_bn=twice") == {"name": "ddg", "warmup": "zeros"}
        assert algorithm_section("algorithm.warmup=zeros") == \
            {"name": "fr", "warmup": "zeros", "replay_bn": "once"}
    assert len(caplog.records) == 1 and f"algorithm.replay_bn (of {owners('replay_bn')})" in caplog.records[0].message


def test_a_key_is_removed_from_the_command_line_with_a_tilde(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model: {name: x, kwargs: {drop_rate: 0.1}}\n"
                                        "algorithm: {name: fr, warmup: zeros}\n"
                                        "optimizer: {lr: 0.5}\n")
    cfg = load_recipe(recipe, ["~algorithm.warmup", "~model.kwargs.drop_rate", "~optimizer.lr"])
    assert dict(cfg.algorithm) == {"name": "fr"} and dict(cfg.model.kwargs) == {}
    assert cfg.optimizer.lr == 0.01  # a schema key goes back to its default
    # later overrides apply after the removal, in order
    assert load_recipe(recipe, ["~algorithm.warmup", "algorithm.warmup=skip"]).algorithm.warmup \
        == "skip"
    with pytest.raises(RecipeError, match=r"^override '~algorithm.warmpu': there is no key "
                                          r"'algorithm.warmpu' to remove\. Did you mean "
                                          r"'algorithm.warmup'\?$"):
        load_recipe(recipe, ["~algorithm.warmpu"])


def test_a_bad_algorithm_option_exits_2_on_the_cli_before_building_anything(capsys):
    code = main(["plan", "model.name=x", "algorithm.name=ddg", "algorithm.replay=twice"])
    err = capsys.readouterr().err
    assert code == 2 and "algorithm 'ddg' (DecoupledBackprop) takes no option 'replay'" in err
    assert "Traceback" not in err and "unknown model" not in err  # failed before the model


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
    with pytest.raises(RecipeError, match="~dotted.key removes a key and takes no value"):
        load_recipe(None, ["model.name=x", "~optimizer.lr=0.1"])


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
