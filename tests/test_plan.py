"""The plan of a run (frzoo.plan): the recipe resolved once, and everything built once per
process from it."""
from __future__ import annotations

import sys
from collections import Counter

import pytest

import frzoo.data
import frzoo.models
import frzoo.plugins
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.plan import make_plan, resolved_plan
from frzoo.run import train

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=32", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "train.max_steps=2", "train.progress=false",
        "split.k=2"]


def count_calls(monkeypatch, module, name: str, counts: Counter) -> None:
    """Count the calls of `module.name` wherever frzoo looks it up (modules that imported it
    by name hold their own reference)."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    for mod in list(sys.modules.values()):
        frzoo_module = str(getattr(mod, "__name__", "")).startswith("frzoo")
        if frzoo_module and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, counted)


@pytest.mark.parametrize("auto", [False, True])
def test_one_run_loads_plugins_builds_the_model_and_the_data_once(tmp_path, monkeypatch, auto):
    """One `frzoo run` in one process: each plugin is loaded once, the data and the model are
    built once, also where split.auto measures the model first (it measures the model the
    build then uses; before the plan: plugins 3-4 passes, data and model twice)."""
    plugin = tmp_path / "noop_plugin.py"
    plugin.write_text("# registers nothing\n")
    counts: Counter = Counter()
    for module, name in ((frzoo.plugins, "load_plugin"), (frzoo.models, "create_model"),
                         (frzoo.data, "build_data")):
        count_calls(monkeypatch, module, name, counts)
    out = tmp_path / "r"
    extra = ["split.auto=flops"] if auto else []
    assert main(["run", *TINY, *extra, f"plugins=[{plugin}]", f"run.out_dir={out}"]) == 0
    assert counts == Counter(load_plugin=1, create_model=1, build_data=1)


def test_a_plan_is_resolved_once_and_workers_take_it_as_it_is(tmp_path):
    plan = make_plan(load_recipe(None, [*TINY, "split.auto=flops"]), tmp_path / "r")
    assert plan.executor == "local" and plan.num_parts == 2 and plan.replicas == 1
    assert plan.cfg.split.auto is None and len(plan.cfg.split.points) == 1  # measured
    assert plan.split_line.startswith("split.auto=flops: points")
    assert dict(plan.cfg.algorithm) == {"name": "fr", "warmup": "skip", "replay_bn": "once"}
    assert not (tmp_path / "r").exists()  # checked, not created
    again = resolved_plan(plan.cfg, tmp_path / "r")  # a worker's: nothing chosen or measured
    for key in ("executor", "algorithm_cls", "options", "num_parts", "replicas", "devices"):
        assert getattr(again, key) == getattr(plan, key), key
    assert again.cfg == plan.cfg and again.split_line is None


def test_each_replica_gets_its_own_devices_from_the_plan():
    plan = make_plan(load_recipe(None, [*TINY, "distributed.replicas=2",
                                        "devices=[cpu,cpu,cpu,cpu]"]))
    assert plan.executor == "distributed" and plan.world_size == 4
    assert plan.devices == (("cpu", "cpu"), ("cpu", "cpu"))  # replica-major, K each
    assert plan.part_devices(3) == ["cpu", "cpu"]


def test_a_refused_plan_leaves_no_run_folder(tmp_path):
    with pytest.raises(FrzooError, match=r"'cuda:7' does not exist .* To try the run on the "
                                         r"CPU, set devices=\[cpu,cpu\]\."):
        train(load_recipe(None, [*TINY, "devices=[cpu,cuda:7]"]), tmp_path / "a")
    with pytest.raises(FrzooError, match="'layer9' is not a module"):
        train(load_recipe(None, [*TINY[:-1], "split.points=[layer9]"]), tmp_path / "b")
    with pytest.raises(FrzooError, match="nothing to resume"):
        train(load_recipe(None, TINY), tmp_path / "c", resume=True)
    assert list(tmp_path.iterdir()) == []


def test_frzoo_plan_prints_the_plan(capsys):
    assert main(["plan", *TINY, "split.auto=flops", "distributed.replicas=2"]) == 0
    out = capsys.readouterr().out
    assert "# executor auto -> distributed: distributed.replicas=2" in out
    assert "# algorithm fr (FeaturesReplay): " in out
    assert "# K=2 parts x R=2 replicas = 4 processes when distributed" in out
    assert "# replica 1 devices: cpu, cpu" in out
    assert "# split.auto=flops: points ['" in out
    assert "auto: null" in out and "partition: K=2 parts" in out


@pytest.mark.slow
def test_under_torchrun_the_folders_writer_measures_split_auto_once_for_every_rank(tmp_path):
    """torchrun starts every rank with the same command line; one rank (the one writing the run
    folder) measures split.auto and every rank cuts the model at its points."""
    import os
    import socket
    import subprocess
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(port), "-m", "frzoo.cli", "run", *TINY, "split.auto=flops", "devices=[cpu,cpu]",
         "train.threads=1", f"run.out_dir={out}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("frzoo: split.auto=flops: points ['layer1']") == 1, proc.stderr
    recipe = (out / "recipe.yaml").read_text()
    assert "- layer1" in recipe and "auto: null" in recipe
