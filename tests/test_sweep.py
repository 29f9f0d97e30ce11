"""Sweeps: a local grid sweep end to end (interrupted and continued), validation before any trial,
and the config a W&B server would get, checked against W&B's own sweep schema."""
from __future__ import annotations

import csv
import json
import signal
import warnings
from pathlib import Path

import pytest
import yaml

from support.wandb_offline import find_offline_runs, read_offline_run

from frzoo import rundir
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.logging import Logger, read_jsonl
from frzoo.sweep import LocalSweep, Trial, load_sweep, override, server_sweep_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import sweeps

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "model": {"name": "test_resnet"},
    "split": {"points": ["layer3"]},
    "data": {"name": "synthetic", "num_train": 32, "num_test": 16, "batch_size": 8,
             "image_size": 16},
    "train": {"epochs": 2, "eval_every": 1, "log_every": 1, "progress": False},
    "logging": {"project": "frzoo-test"},
}


pytestmark = pytest.mark.usefixtures("wandb_env")  # tests/conftest.py


def write_sweep(tmp_path: Path, parameters: dict, **extra) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    sweep = {"recipe": "tiny.yaml", "name": "tiny-grid", "method": "grid",
             "metric": {"name": "test/acc1", "goal": "maximize"}, "parameters": parameters,
             **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


class InterruptOnce(Logger):
    """Presses Ctrl-C at the first training record of one trial, as a user would."""

    def __init__(self) -> None:
        self.fired = False

    def log(self, record, step):
        if not self.fired and record["kind"] == "train":
            self.fired = True
            signal.raise_signal(signal.SIGINT)


@pytest.mark.slow
def test_local_grid_sweep_of_four_trials_interrupted_and_continued(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optimizer.lr": {"values": [0.01, 0.1]},
                                  "split.points": {"values": [["layer2"], ["layer3"]]}})
    root = tmp_path / "sweeps"
    interrupter = InterruptOnce()
    first = LocalSweep(load_sweep(path), root=root, echo=lambda *_: None,
                       extra_loggers=lambda name: [interrupter] if name == "t002" else [])
    result = first.run()
    assert result.interrupted
    assert [(t.name, t.state) for t in result.trials] == [("t001", "finished"),
                                                          ("t002", "running")]

    # the same command again: t001 is not repeated, t002 resumes from its checkpoint
    assert main(["sweep", str(path), "--local", "--dir", str(root)]) == 0
    sweep_dir = root / "tiny-grid"
    state = json.loads((sweep_dir / "state.json").read_text())
    trials = state["trials"]
    assert [t["name"] for t in trials] == ["t001", "t002", "t003", "t004"]
    assert all(t["state"] == "finished" for t in trials)
    assert sorted((t["params"]["optimizer.lr"], t["params"]["split.points"][0]) for t in trials) \
        == [(0.01, "layer2"), (0.01, "layer3"), (0.1, "layer2"), (0.1, "layer3")]
    runs_per_trial = {t["name"]: len(find_offline_runs(sweep_dir / "trials" / t["name"]))
                      for t in trials}
    assert runs_per_trial == {"t001": 1, "t002": 2, "t003": 1, "t004": 1}
    steps = [r["step"] for r in read_jsonl(sweep_dir / "trials" / "t002" / "metrics.jsonl")
             if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # resumed, no step twice
    assert trials[1]["history"] == [r["test/acc1"] for r in read_jsonl(
        sweep_dir / "trials" / "t002" / "metrics.jsonl") if r["kind"] == "eval"]

    # each trial is an offline W&B run grouped under the sweep, configured with its parameters
    run = read_offline_run(sweep_dir / "trials" / "t003")
    assert run.run["group"] == "tiny-grid" and run.run["name"] == "tiny-grid-t003"
    assert "sweep" in run.run["tags"]
    assert run.config["optimizer"]["lr"] == trials[2]["params"]["optimizer.lr"]
    assert run.config["split"]["points"] == trials[2]["params"]["split.points"]
    assert run.summary["test/acc1"] == trials[2]["metric"]

    # the leaderboard: markdown and CSV, best first by the sweep's metric
    with open(sweep_dir / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    values = [float(r["test/acc1"]) for r in rows]
    assert len(rows) == 4 and values == sorted(values, reverse=True)
    assert {"optimizer.lr", "split.points", "best_test_acc1"} <= set(rows[0])
    board = (sweep_dir / "leaderboard.md").read_text()
    assert "| rank | trial | state | test/acc1 | optimizer.lr | split.points |" in board
    assert board.count("| finished |") == 4

    # a third time: nothing left to run, nothing repeated
    capsys.readouterr()
    assert main(["sweep", str(path), "--local", "--dir", str(root)]) == 0
    assert sum(len(find_offline_runs(d)) for d in (sweep_dir / "trials").iterdir()) == 5
    assert "4 trials" in capsys.readouterr().out

    # continuing with different overrides is refused, naming what changed
    with pytest.raises(FrzooError, match=r"different overrides.*--name"):
        LocalSweep(load_sweep(path, ["optimizer.momentum=0.5"]), root=root).run()


@pytest.mark.parametrize("parameters, key, says", [
    ({"optimizer.lrr": {"values": [0.1]}}, "optimizer.lrr", "Did you mean 'optimizer.lr'"),
    ({"optimizer.lr": {"values": [0.1, -1]}}, "optimizer.lr", "must be zero or more"),
    ({"train.epochs": {"values": [1, "many"]}}, "train.epochs", "many"),
    ({"algorithm.name": {"values": ["fr", "fancy"]}}, "algorithm.name",
     "unknown algorithm 'fancy'"),
    ({"split.points": {"values": [["layer3"], ["layer9"]]}}, "split.points", "layer9"),
    ({"algorithm.replay_bn": {"values": ["once", "thrice"]}}, "algorithm.replay_bn",
     "algorithm.replay_bn='thrice' is not one of once, twice"),
    ({"optimizer.lr": {"min": -1.0, "max": 0.1}}, "optimizer.lr", "must be zero or more"),
])
def test_bad_sweeps_fail_before_any_trial_naming_the_key(tmp_path, capsys, parameters, key, says):
    path = write_sweep(tmp_path, parameters)
    root = tmp_path / "sweeps"
    assert main(["sweep", str(path), "--local", "--dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"parameter '{key}'" in err and says in err, err
    assert not root.exists()  # no trial started, not even a sweep folder


def test_algorithm_options_are_sweepable_and_checked_per_combination(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, {"algorithm.replay_bn": {"values": ["once", "twice"]},
                                             "algorithm.warmup": {"values": ["skip", "zeros"]}}))
    assert spec.parameters["algorithm.replay_bn"] == {"values": ["once", "twice"]}
    # bp takes no replay_bn, but fr does: the grid point (bp, twice) runs bp without it
    load_sweep(write_sweep(tmp_path, {"algorithm.name": {"values": ["fr", "bp"]},
                                      "algorithm.replay_bn": {"values": ["twice"]}}))
    # an option no algorithm takes is refused for every value of algorithm.name
    with pytest.raises(FrzooError, match=r"parameter 'algorithm.replay_bm' value \"twice\" is "
                                         r"rejected: algorithm 'fr' \(FeaturesReplay\) takes no "
                                         r"option 'replay_bm'.*Did you mean 'replay_bn'"):
        load_sweep(write_sweep(tmp_path, {"algorithm.name": {"values": ["fr", "bp"]},
                                          "algorithm.replay_bm": {"values": ["twice"]}}))
    # each value alone is valid, the pair is not (a batch of 9 rows in 2 equal shares)
    path = write_sweep(tmp_path, {"data.batch_size": {"values": [8, 9]},
                                  "distributed.replicas": {"values": [1, 2]}})
    with pytest.raises(FrzooError, match=r"the combination \{\"data.batch_size\": 9, "
                                         r"\"distributed.replicas\": 2\} is invalid: "
                                         r"data.batch_size=9 is the global batch"):
        load_sweep(path)


def test_a_sweep_over_the_algorithm_runs_every_trial_on_the_paper_recipe(tmp_path):
    """docs/recipes.md, "Switching the algorithm": the paper's recipe, with fr's options set as
    its users do, swept over fr, bp and ddg; every trial runs, and each trial's recipe.yaml holds
    exactly the options its algorithm used."""
    sweep = {"recipe": str(REPO / "recipes" / "cifar100_resnet101.yaml"), "name": "algorithms",
             "method": "grid", "metric": {"name": "test/acc1", "goal": "maximize"},
             "overrides": ["model.name=test_resnet", "devices=null", "data.name=synthetic",
                           "data.num_train=16", "data.num_test=8", "data.batch_size=8",
                           "data.image_size=16", "train.max_steps=3", "train.threads=1",
                           "train.progress=false", "algorithm.warmup=zeros",
                           "algorithm.replay_bn=twice"],
             "parameters": {"algorithm.name": {"values": ["fr", "bp", "ddg"]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = LocalSweep(load_sweep(path), root=tmp_path / "sweeps", wandb_mode="disabled",
                        echo=lambda *_: None).run()
    assert [(t.params, t.state) for t in result.trials] == [
        ({"algorithm.name": name}, "finished") for name in ("fr", "bp", "ddg")]
    recorded = [yaml.safe_load((tmp_path / "sweeps" / "algorithms" / "trials" / t.name /
                                "recipe.yaml").read_text())["algorithm"] for t in result.trials]
    assert recorded == [{"name": "fr", "warmup": "zeros", "replay_bn": "twice"},
                        {"name": "bp"}, {"name": "ddg", "warmup": "zeros"}]


def test_sweep_file_errors(tmp_path):
    path = write_sweep(tmp_path, {"optimizer.lr": {"values": [0.1]}})
    raw = yaml.safe_load(path.read_text())
    for change, says in [({"recipe": None}, r"needs `recipe: PATH`"),
                         ({"recipe": "nope.yaml"}, r"recipe 'nope.yaml' does not exist"),
                         ({"method": "newton"}, r"W&B's sweep schema"),
                         ({"metric": {"name": "test/acc", "goal": "maximize"}},
                          r"Did you mean 'test/acc1'"),
                         ({"parameters": {"optimizer": {"parameters": {"lr": {"value": 1}}}}},
                          r"write each recipe key dotted")]:
        bad = {k: v for k, v in {**raw, **change}.items() if v is not None}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(FrzooError, match=says):
            load_sweep(path)
    path.write_text(yaml.safe_dump({**raw, "method": "random"}))
    with pytest.raises(FrzooError, match=r"run_cap"):
        LocalSweep(load_sweep(path), root=tmp_path / "sweeps").run()


@pytest.mark.parametrize("sweep_file", sorted((REPO / "recipes" / "sweeps").glob("*.yaml")))
def test_server_sweep_config_validates_against_the_sweeps_schema(sweep_file, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_sweep(sweep_file.relative_to(REPO))
    config = server_sweep_config(spec)
    assert sweeps.schema_violations_from_proposed_config(config) == []
    sweeps.SweepConfig(config)  # raises on a schema violation
    assert "recipe" not in config and "overrides" not in config
    command = config["command"]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "frzoo.cli", "run"]
    assert command[-1] == "${args_no_hyphens}" and "logging.wandb=true" in command
    recipe = command[5]
    assert (REPO / recipe).is_file() and not Path(recipe).is_absolute()
    # what an agent would run: W&B's first proposal, formatted as the agent formats it
    proposal = sweeps.next_run(config, [])
    args = [f"{k}={v['value']}" for k, v in proposal.config.items()]
    cfg = load_recipe(recipe, [*command[6:-1], *args])
    for key, value in proposal.config.items():
        from omegaconf import OmegaConf
        assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"] \
            == value["value"], key


def test_server_sweep_needs_a_key_and_says_how_to_run_without(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optimizer.lr": {"values": [0.1]}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "API key" in err and "--local" in err
    assert main(["sweep", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["parameters"] == {"optimizer.lr": {"values": [0.1]}}
    assert main(["agent", "someone/project/abc123"]) == 2
    assert "API key" in capsys.readouterr().err


def test_values_an_agent_cannot_pass_are_refused_for_the_server_only(tmp_path):
    path = write_sweep(tmp_path, {"data.limit_train": {"values": [None, 16]}})
    spec = load_sweep(path)  # fine locally: frzoo writes data.limit_train=null
    with pytest.raises(FrzooError, match=r"data.limit_train.*--local"):
        server_sweep_config(spec)


def test_overrides_read_back_as_the_value():
    from omegaconf import OmegaConf
    for key, value in [("a", 0.05), ("a", 1e-5), ("a", "fr"), ("a", "1e-3"), ("a", "true"),
                       ("a", None), ("a", True), ("a.b", ["layer2", "layer4"]), ("a", 3)]:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([override(key, value)]))
        node = parsed
        for part in key.split("."):
            node = node[part]
        assert node == value and type(node) is type(value), (key, value)


def test_early_termination_uses_wandb_hyperband(tmp_path):
    path = write_sweep(tmp_path, {"optimizer.lr": {"values": [0.01, 0.1, 1.0]}},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    sweep = LocalSweep(load_sweep(path), root=tmp_path / "sweeps", echo=lambda *_: None)
    sweep.trials = [Trial("t001", {"optimizer.lr": 0.01}, "finished", 80.0, [70.0, 80.0]),
                    Trial("t002", {"optimizer.lr": 0.1}, "finished", 60.0, [50.0, 60.0])]
    current = Trial("t003", {"optimizer.lr": 1.0})
    sweep.trials.append(current)
    assert sweep._should_stop(current, [10.0])  # far below the others after one eval
    assert not sweep._should_stop(current, [75.0])


def test_an_early_terminated_trial_stops_with_a_checkpoint_and_counts_as_stopped(tmp_path):
    path = write_sweep(tmp_path, {"optimizer.lr": {"values": [0.05]}},
                       early_terminate={"type": "hyperband", "min_iter": 1})

    class StopAtFirstEval(LocalSweep):
        def _should_stop(self, trial, history):
            return True

    result = StopAtFirstEval(load_sweep(path), root=tmp_path / "sweeps", wandb_mode="disabled",
                             echo=lambda *_: None).run()
    (trial,) = result.trials
    assert trial.state == "stopped" and not result.interrupted
    assert trial.summary["steps"] < 8 and trial.summary["interrupted"]
    assert trial.metric is not None and len(trial.history) == 1
    assert rundir.checkpoint_path(result.sweep_dir / "trials" / "t001").is_dir()
    assert "| stopped |" in result.leaderboard.read_text()
