"""The trainer and the CLI end to end: outputs, resume exactness, export, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from frzoo import rundir
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.executors.part_state import read_checkpoint
from frzoo.run import train

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=2", "train.progress=false", "train.eval_every=1",
        "optimizer.lr=0.05", "optimizer.nesterov=true"]


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def test_outputs_of_a_run(tmp_path):
    summary = run(tmp_path / "r")
    out = tmp_path / "r"
    for name in ("recipe.yaml", "partition.json", "metrics.jsonl", "summary.json", "final.pt"):
        assert (out / name).is_file(), name
    assert (rundir.checkpoint_path(out) / ".metadata").is_file()
    assert rundir.checkpoint_path(out).name.startswith("step-00000012-")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "eval"}
    train_rec = next(r for r in records if r["kind"] == "train")
    for key in ("train/loss", "train/acc", "train/lr", "train/images_per_s", "part1/lr",
                "part3/backward_s", "time/train_s", "time/wall_s"):
        assert key in train_rec
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    assert "test/acc5" in evals[0]
    assert summary["steps"] == 12 and summary["num_parts"] == 3
    assert json.loads((out / "summary.json").read_text())["final_test_acc1"] == evals[-1]["test/acc1"]
    # the clocks: training seconds end at summary.json's; wall seconds include evaluation
    trains = [r for r in records if r["kind"] == "train"]
    assert trains[-1]["time/train_s"] == summary["train_seconds"] == evals[-1]["time/train_s"]
    for key in ("time/train_s", "time/wall_s"):
        assert [r[key] for r in trains] == sorted(r[key] for r in trains)
    assert all(r["time/wall_s"] > r["time/train_s"] for r in trains)
    table = json.loads((out / "partition.json").read_text())
    assert [row["history"] for row in table] == [3, 2, 0]
    # final.pt loads into the plain timm model, strictly, and predicts as the trained parts did
    model = timm.create_model("test_resnet", num_classes=10, in_chans=3)
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """9 steps without a stop: what the resume tests end with (built once for this file)."""
    out = tmp_path_factory.mktemp("straight") / "r"
    run(out, "train.max_steps=9")
    return out


def test_resume_is_bit_for_bit(tmp_path, straight):
    stopped = tmp_path / "stopped"
    run(stopped, "train.max_steps=5")  # stops mid-epoch (6 steps per epoch) with a delta in flight
    run(stopped, "train.max_steps=9", resume=True)
    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(stopped / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics after the resume point are not duplicated; the clocks continue
    records = [json.loads(l) for l in (stopped / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in trains]
    assert steps == sorted(set(steps))
    for key in ("time/train_s", "time/wall_s"):
        assert [r[key] for r in trains] == sorted(r[key] for r in trains)


def test_should_stop_stops_like_ctrl_c_and_resumes_bit_for_bit(tmp_path, straight):
    asked = []
    stopped = tmp_path / "stopped"
    cfg = load_recipe(None, [*TINY, "train.max_steps=9", f"run.out_dir={stopped}"])
    summary = train(cfg, stopped,
                    should_stop=lambda: asked.append(1) or len(asked) > 4)
    assert summary["interrupted"] and summary["steps"] == 4  # asked before each step
    assert read_checkpoint(stopped)["progress"]["step"] == 4
    run(stopped, "train.max_steps=9", resume=True)
    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(stopped / "final.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_another_recipe_says_what_differs(tmp_path):
    run(tmp_path / "r", "train.max_steps=2")
    with pytest.raises(FrzooError, match=r"optimizer.lr: 0.05 in the checkpoint, 0.1 now"):
        run(tmp_path / "r", "optimizer.lr=0.1", resume=True)
    with pytest.raises(FrzooError, match=r"data.batch_size: 8 in the checkpoint, 4 now"):
        run(tmp_path / "r", "data.batch_size=4", resume=True)
    # the run recorded its algorithm's options, defaults included (changing the split or the
    # algorithm on resume: tests/test_checkpoints.py)
    assert yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())["algorithm"] == \
        {"name": "fr", "warmup": "skip", "replay_bn": "once"}


def test_resume_accepts_a_checkpoint_holding_options_its_algorithm_never_took(tmp_path):
    """Checkpoints from before algorithms declared their options hold fr's warmup/replay_bn
    whatever the algorithm (the build dropped those it did not take): bp resumes them."""
    run(tmp_path / "r", "algorithm.name=bp", "train.max_steps=2")
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"  # such a checkpoint was of format 1
    state = read_checkpoint(tmp_path / "r")
    assert state["recipe"]["algorithm"] == {"name": "bp"}
    state["recipe"]["algorithm"].update(warmup="skip", replay_bn="once")
    torch.save(state, ckpt)
    shutil.rmtree(rundir.checkpoint_path(tmp_path / "r"))
    assert run(tmp_path / "r", "algorithm.name=bp", "train.max_steps=3", resume=True)["steps"] == 3
    assert not ckpt.exists()  # its next checkpoint is of format 2


def test_a_used_run_folder_is_not_overwritten(tmp_path):
    run(tmp_path / "r", "train.max_steps=1")
    with pytest.raises(FrzooError, match="already holds a run.*--resume"):
        run(tmp_path / "r")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(FrzooError, match=r"loss is (nan|inf) at step \d+.*last good checkpoint"):
        run(out, "optimizer.lr=1e30", "train.checkpoint_every=1", "train.max_steps=12")
    state = read_checkpoint(out)
    for part in state["parts"]:
        for value in part["model"].values():
            assert torch.isfinite(value.float()).all()


def test_bp_and_fr_k1_give_the_same_final_weights(tmp_path):
    run(tmp_path / "fr", "split.points=null", "algorithm.name=fr", "train.max_steps=4")
    run(tmp_path / "bp", "split.points=null", "algorithm.name=bp", "train.max_steps=4")
    a = torch.load(tmp_path / "fr" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "bp" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str, capsys) -> tuple:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys):
    code, _, err = cli("run", *TINY, "model.name=resnet181", f"run.out_dir={tmp_path}/a", capsys=capsys)
    assert code == 2 and "unknown model 'resnet181'" in err and "Did you mean: resnet18" in err
    code, _, err = cli("run", *TINY, "devices=[cpu,cpu]", f"run.out_dir={tmp_path}/b", capsys=capsys)
    assert code == 2 and "devices lists 2 devices" in err and "3 parts" in err
    code, _, err = cli("run", *TINY, "devices=[cpu,cpu,cuda:3]", f"run.out_dir={tmp_path}/c", capsys=capsys)
    assert code == 2 and "'cuda:3' does not exist" in err and "available here: cpu" in err
    code, _, err = cli("run", *TINY, "split.points=[layer2,layer9]", f"run.out_dir={tmp_path}/d", capsys=capsys)
    assert code == 2 and "'layer9' is not a module" in err and "Valid points" in err
    code, _, err = cli("run", *TINY, "data.name=cifar10", f"data.root={tmp_path}/nodata",
                       f"run.out_dir={tmp_path}/e", capsys=capsys)
    assert code == 2 and "data.download" in err
    code, _, err = cli("run", *TINY, "algorithm.name=ddg", "algorithm.replay_bm=twice",
                       f"run.out_dir={tmp_path}/f", capsys=capsys)  # fr's replay_bn is dropped
    assert code == 2 and "algorithm 'ddg' (DecoupledBackprop) takes no option 'replay_bm'; its " \
                         "options: warmup" in err
    assert not (tmp_path / "f" / "checkpoints").exists()  # refused before training
    assert "Traceback" not in err


def test_cli_plan_models_export_eval(tmp_path, capsys):
    code, out, _ = cli("plan", *TINY, capsys=capsys)
    assert code == 0
    assert "partition: K=3 parts" in out and "conv1 .. layer1" in out
    assert "equal the whole model exactly" in out
    code, out, _ = cli("models", "cifar_resnet1", capsys=capsys)
    assert code == 0 and "cifar_resnet110  [frzoo_registry.cifar_resnet]" in out
    code, out, _ = cli("models", "resnet18*", capsys=capsys)
    assert "resnet18" in out.split()
    run_dir = tmp_path / "r"
    assert cli("run", *TINY, "train.max_steps=3", f"run.out_dir={run_dir}", capsys=capsys)[0] == 0
    exported = tmp_path / "exported.pt"
    code, out, _ = cli("export", str(run_dir), "-o", str(exported), capsys=capsys)
    assert code == 0
    a = torch.load(exported, weights_only=True)
    b = torch.load(run_dir / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    code, out, _ = cli("eval", str(run_dir), capsys=capsys)
    assert code == 0
    final = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(out)["test_acc1"] == final["final_test_acc1"]


def test_resume_from_the_cli_with_the_saved_recipe(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert cli("run", *TINY, "train.max_steps=2", f"run.out_dir={run_dir}", capsys=capsys)[0] == 0
    code, out, _ = cli("run", "--resume", str(run_dir), "train.max_steps=4", capsys=capsys)
    assert code == 0 and "4 steps" in out


def test_npz_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(40, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=40)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:8], y_test=y[:8])
    cfg = load_recipe(None, [*TINY, "data.name=npz", f"data.path={tmp_path}/d.npz",
                             "data.image_size=null", "train.max_steps=3"])
    summary = train(cfg, tmp_path / "r")
    assert summary["steps"] == 3
    model = timm.create_model("test_resnet", num_classes=4)
    model.load_state_dict(torch.load(tmp_path / "r" / "final.pt", weights_only=True))


@pytest.mark.slow(seconds=180)  # the longest test: a minute of training alone, started first
def test_quickstart_from_the_cli_reaches_95_percent(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "frzoo.cli", "run", str(REPO / "recipes/quickstart.yaml"),
                           f"run.out_dir={out}", "train.progress=false"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc1"] >= 95.0, summary
    assert summary["num_parts"] == 2 and summary["algorithm"] == "fr"


def test_a_resume_with_more_steps_keeps_the_cosine_curve_and_says_so(tmp_path, caplog):
    """issue 22 item 6: the lr schedule keeps the horizon of the run's first start; the steps
    past it run at the curve's last value, not at a restarted (75x higher) rate."""
    cosine = ["optimizer.schedule.name=cosine", "train.log_every=1"]
    run(tmp_path / "r", *cosine, "train.max_steps=4")
    caplog.set_level("INFO", logger="frzoo")
    run(tmp_path / "r", *cosine, "train.max_steps=6", resume=True)
    assert "keeps the horizon of this run's first start (4 steps); steps 4..5 run at its " \
           "final lr 0" in caplog.text
    records = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in records if r["kind"] == "train"}
    assert lrs[1] == 0.05 and 0 < lrs[4] < lrs[3] < lrs[2] < lrs[1] and lrs[5] == lrs[6] == 0.0
    assert read_checkpoint(tmp_path / "r")["progress"]["lr_steps"] == 4


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="this machine has the recipe's GPUs")
def test_the_flagship_recipe_without_its_gpus_says_how_to_try_it_on_the_cpu(tmp_path, capsys):
    """issue 22 item 14: one line with the fix, and no run folder left behind."""
    out = tmp_path / "flagship"
    code, _, err = cli("run", str(REPO / "recipes/cifar100_resnet101.yaml"), f"run.out_dir={out}",
                       capsys=capsys)
    assert code == 2 and "does not exist on this machine" in err, err
    assert "To try the run on the CPU, set devices=[cpu,cpu,cpu,cpu]." in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert not out.exists()
