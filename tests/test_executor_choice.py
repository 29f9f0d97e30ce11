"""`executor: auto`: one process per part when the parts sit on two or more devices, else one.

The choice is made in one place (frzoo.plan.choose_executor) and printed by `frzoo run` (its
first line) and `frzoo plan`; the recipes in recipes/ run in parallel as written.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import RecipeError
from frzoo.plan import choose_executor, executor_line
from frzoo.run import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=16", "data.num_test=8",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer3]",
        "train.progress=false", "train.max_steps=1"]


@pytest.mark.parametrize("devices,name,reason", [
    (None, "local", "2 parts, all on cpu: one process"),
    ("[cpu,cpu]", "local", "2 parts, all on cpu: one process"),
    ("[cuda,cuda:0]", "local", "2 parts, all on cuda:0: one process"),
    ("[cuda:0,cuda:1]", "distributed", "2 parts on 2 devices (cuda:0, cuda:1)"),
    ("[cpu,cuda:0]", "distributed", "2 parts on 2 devices (cpu, cuda:0)"),
])
def test_auto_is_distributed_exactly_when_the_parts_are_on_several_devices(devices, name, reason):
    cfg = load_recipe(None, [*TINY, *([f"devices={devices}"] if devices else [])])
    assert cfg.executor == "auto"
    assert choose_executor(cfg) == (name, reason)


def test_explicit_choices_stand_and_sigma_keeps_auto_in_one_process():
    cfg = load_recipe(None, [*TINY, "devices=[cuda:0,cuda:1]", "executor=local"])
    assert executor_line(cfg) == ("local", "executor local: as the recipe sets (2 parts)")
    cfg = load_recipe(None, [*TINY, "devices=[cuda:0,cuda:1]", "train.sigma_every=5"])
    assert choose_executor(cfg)[0] == "local" and "train.sigma_every" in choose_executor(cfg)[1]
    with pytest.raises(RecipeError, match="sigma_every.*executor=local"):
        load_recipe(None, [*TINY, "train.sigma_every=5", "executor=distributed"])


def test_the_recipes_run_in_parallel_as_written():
    for path in sorted(REPO.glob("recipes/*.yaml")) + sorted(REPO.glob("recipes/base/*.yaml")):
        cfg = load_recipe(path)
        devices = set(cfg.devices or ["cpu"])
        expected = "distributed" if len(devices) > 1 else "local"
        assert choose_executor(cfg)[0] == expected, path
    paper = load_recipe(REPO / "recipes" / "cifar10_resnet101.yaml")
    assert executor_line(paper)[1] == "executor auto -> distributed: 4 parts on 4 devices (cuda:0..3)"


def test_the_choice_is_the_first_line_of_a_run_and_is_in_the_plan(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="frzoo")
    summary = train(load_recipe(None, TINY), tmp_path / "r")
    assert caplog.messages[0] == "executor auto -> local: 2 parts, all on cpu: one process"
    assert summary["executor"] == "local"  # the run records what ran
    assert "executor: local" in (tmp_path / "r" / "recipe.yaml").read_text()
    assert main(["plan", *TINY]) == 0
    assert "# executor auto -> local: 2 parts, all on cpu: one process" in capsys.readouterr().out
