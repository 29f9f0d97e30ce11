"""W&B logging through real offline runs: what the `.wandb` file holds equals metrics.jsonl.

No mocks of wandb: each test that logs starts a real offline W&B run (about 0.3-1 s) under the
test's tmp dir and reads the run file back with tests/support/wandb_offline.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from support.wandb_offline import find_offline_runs, read_offline_run

from frzoo import metrics
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.logging import build_loggers, read_jsonl
from frzoo.logging.wandb import WandbLogger, resolve_mode, run_file_complete, run_file_records
from frzoo.run import train

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=32", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer3]", "train.epochs=2",
        "train.eval_every=1", "train.log_every=2", "train.progress=false", "optimizer.lr=0.05"]


pytestmark = pytest.mark.usefixtures("wandb_env")  # tests/conftest.py


def rows_by_step(history):
    out = {}
    for row in history:
        out.setdefault(row["_step"], {}).update(row)
    return out


def test_offline_run_holds_config_metrics_table_summary_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", *TINY, f"run.out_dir={out}", "logging.wandb=true", "logging.mode=auto",
                 "logging.log_model=true", "logging.group=g1", "logging.name=tiny",
                 "logging.tags=[a,b]", "logging.project=frzoo-test"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("W&B: offline run (no W&B API key is configured)") == 1
    assert "wandb sync" in err
    files = find_offline_runs(out)
    assert len(files) == 1
    run = read_offline_run(out)
    assert run.exit_code == 0
    assert run.run["group"] == "g1" and run.run["name"] == "tiny" and run.run["tags"] == ["a", "b"]
    assert run.run["project"] == "frzoo-test"

    # config = the resolved recipe + the resolved partition
    import yaml
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    table = json.loads((out / "partition.json").read_text())
    for section, values in recipe.items():
        assert run.config[section] == values, section
    assert run.config["partition"] == [row["modules"] for row in table]
    assert run.config["num_parts"] == 2

    # every metrics.jsonl value is in the W&B history at the same step, under the same name
    records = read_jsonl(out / "metrics.jsonl")
    by_step = rows_by_step(run.history)
    expected_names = set()
    for record in records:
        values = {k: v for k, v in record.items() if k not in ("step", "kind")}
        expected_names |= set(values)
        row = by_step[record["step"]]
        for name, value in values.items():
            assert row[name] == pytest.approx(value, rel=1e-12), (record["step"], name)
    logged = set(run.metric_names()) - {"partition"}
    assert logged == expected_names
    # the names W&B dashboards and sweeps know, plus the run's clocks
    assert {"train/loss", "train/acc", "train/images_per_s", "train/lr", "part1/lr",
            "part2/lr", "part1/forward_s", "part1/backward_s", "part2/backward_s", "epoch",
            "test/loss", "test/acc1", "test/acc5", "time/train_s", "time/wall_s"} <= logged

    # the partition as a W&B table, logged at the first step
    cell = by_step[0]["partition"]
    assert cell["_type"] == "table-file"
    logged_table = json.loads((run.files_dir / cell["path"]).read_text())
    staleness = logged_table["columns"].index("staleness")
    assert [r[staleness] for r in logged_table["data"]] == [row["staleness"] for row in table]

    # the summary: frzoo's summary.json, per-part facts, last metric values
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_test_acc1", "final_test_acc1", "steps", "num_parts"):
        assert run.summary[key] == summary[key], key
    assert run.summary["part1/staleness"] == 1 and run.summary["part2/staleness"] == 0
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert run.summary["test/acc1"] == last_eval["test/acc1"]

    # the final model as an artifact
    assert {"type": "model", "name": f"model-{run.run['id']}", "files": ["final.pt"]} in run.artifacts

    # a file cut short (a run still being written, or killed) reads as far as it goes
    data = files[0].read_bytes()
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(data[:len(data) // 2])
    assert run_file_complete(files[0]) and not run_file_complete(cut)
    partial = read_offline_run(cut)
    assert partial.exit_code is None and partial.run["id"] == run.run["id"]
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a run")
    assert not run_file_complete(bad) and not run_file_complete(tmp_path / "nothing-here")
    with pytest.raises(FrzooError, match=r"not a W&B run file"):
        list(run_file_records(bad))


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "run"
    messages = []

    def run(max_steps: int, resume: bool) -> None:
        cfg = load_recipe(None, [*TINY, f"train.max_steps={max_steps}", f"run.out_dir={out}",
                                 "logging.wandb=true", "logging.mode=offline"])
        loggers = build_loggers(cfg.logging, out_dir=out, resume=resume, echo=messages.append)
        train(cfg, out, resume=resume, loggers=loggers)

    run(2, resume=False)
    run(6, resume=True)
    first, second = (read_offline_run(p) for p in find_offline_runs(out))
    assert first.run["id"] == second.run["id"]
    assert max(r["_step"] for r in first.history) == 2
    steps = sorted({r["_step"] for r in second.history})
    assert steps and steps[0] > 2 and "partition" not in second.metric_names()
    assert sum("offline" in m for m in messages) == 2


def test_unreachable_server_falls_back_to_offline_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "run"
    cfg = load_recipe(None, [*TINY, "train.max_steps=2", f"run.out_dir={out}",
                             "logging.wandb=true", "logging.mode=online"])
    messages = []
    loggers = build_loggers(cfg.logging, out_dir=out, echo=messages.append)
    summary = train(cfg, out, loggers=loggers)
    assert summary["steps"] == 2
    assert loggers[0].mode == "offline"
    assert len(messages) == 1 and "unreachable" in messages[0] and "wandb sync" in messages[0]
    assert read_offline_run(out).summary["steps"] == 2


def test_a_failing_wandb_call_does_not_stop_training(tmp_path):
    messages = []
    logger = WandbLogger(out_dir=tmp_path, mode="offline", echo=messages.append)
    logger.start({"recipe": {"model": {"name": "m"}}, "partition": [], "step": 0})

    def broken(*args, **kwargs):
        raise ConnectionError("the network went away")

    logger.run.log = broken
    logger.log({"kind": "train", "loss": 1.0}, 1)  # no exception
    logger.log({"kind": "train", "loss": 0.5}, 2)
    logger.summary({"steps": 2})
    logger.finish()
    failures = [m for m in messages if "call failed" in m]
    assert len(failures) == 1 and "ConnectionError" in failures[0]


def test_mode_resolution(monkeypatch, tmp_path):
    assert resolve_mode("auto")[0] == "offline"
    assert resolve_mode("offline")[0] == "offline"
    assert resolve_mode("disabled")[0] == "disabled"
    assert resolve_mode("online") == ("offline", "logging.mode is online but no W&B API key is "
                                                 "configured")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto")[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment decides `auto` first
    assert resolve_mode("auto")[0] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto")[0] == "online"


def test_no_wandb_unless_asked_and_only_in_the_logging_process(tmp_path):
    off = load_recipe(None, ["model.name=m"]).logging
    assert build_loggers(off, out_dir=tmp_path) == []
    disabled = load_recipe(None, ["model.name=m", "logging.wandb=true",
                                  "logging.mode=disabled"]).logging
    assert build_loggers(disabled, out_dir=tmp_path) == []
    on = load_recipe(None, ["model.name=m", "logging.wandb=true"]).logging
    assert build_loggers(on, out_dir=tmp_path, leader=False) == []
    assert [type(lg).__name__ for lg in build_loggers(on, out_dir=tmp_path)] == ["WandbLogger"]
    assert not (tmp_path / "wandb").exists()  # the run opens in start(), not when built


def test_missing_wandb_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    on = load_recipe(None, ["model.name=m", "logging.wandb=true"]).logging
    with pytest.raises(FrzooError, match=r"pip install wandb"):
        build_loggers(on, out_dir=tmp_path)


def test_sweep_metric_names():
    for name in ("train/loss", "test/acc1", "part3/backward_s", "part2/lr", "part1/sigma",
                 "part12/max_memory_allocated_mb", "time/train_s", "epoch", "best_test_acc1"):
        assert metrics.check_metric_name(name) is None, name
    assert "Did you mean 'test/acc1'" in metrics.check_metric_name("test/acc")
    assert "Did you mean 'part2/forward_s'" in metrics.check_metric_name("part2/forwrd_s")
    for name in ("part0/lr", "train/foo", "loss", "partK/lr"):
        assert "not a name frzoo logs" in metrics.check_metric_name(name), name


def test_frzoo_run_without_wandb_writes_no_wandb_files(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "train.max_steps=1", f"run.out_dir={out}"]) == 0
    assert not (out / "wandb").exists()
    assert Path(out / "metrics.jsonl").is_file()
