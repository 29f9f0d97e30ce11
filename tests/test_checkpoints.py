"""Checkpoints of format 2 (torch.distributed.checkpoint folders, frzoo.checkpoint_files): a
format-1 `last.pt` still resumes; asynchronous saves resume bit for bit and never overlap; a
full disk in the middle of a save keeps the previous checkpoint; a resume with another split or
algorithm carries the weights and the optimizer state exactly and starts the warm-up afresh,
saying so; `model.init_checkpoint` and `frzoo export` read a run folder or a checkpoint.
In-process, local executor;
the distributed executor's saves run through tests/test_distributed*.py, test_reliability.py
and test_torchrun.py.
"""
from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from frzoo import checkpoint_files, rundir
from frzoo.checkpoint_files import DcpCheckpoint
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.executors.part_state import read_checkpoint
from frzoo.run import build, train

# 6 steps per epoch; checkpoints at 4, 6 (epoch end), 8 and the end
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=2", "train.progress=false", "train.threads=1", "train.log_every=2",
        "train.checkpoint_every=4", "optimizer.lr=0.05"]


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    return train(load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"]), out, resume=resume)


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "r"
    run(out, "train.max_steps=9")
    return final(out)


def test_a_format1_checkpoint_still_resumes_bit_for_bit(tmp_path, straight):
    out = tmp_path / "r"
    run(out, "train.max_steps=5")
    old = rundir.checkpoints_dir(out) / "last.pt"
    torch.save(read_checkpoint(out), old)  # format 1's form of the same state
    shutil.rmtree(rundir.checkpoint_path(out))
    assert rundir.checkpoint_path(out) == old and read_checkpoint(out)["progress"]["step"] == 5
    run(out, "train.max_steps=9", resume=True)
    assert_same(straight, final(out))
    assert not old.exists() and rundir.checkpoint_path(out).is_dir()  # replaced by format 2


def test_asynchronous_saves_resume_bit_for_bit_one_at_a_time(tmp_path, straight, monkeypatch):
    futures = []
    async_save = checkpoint_files.dcp.async_save

    def one_at_a_time(*args, **kwargs):
        assert all(f.done() for f in futures)  # the previous save completed first
        futures.append(async_save(*args, **kwargs))
        return futures[-1]

    monkeypatch.setattr(checkpoint_files.dcp, "async_save", one_at_a_time)
    out = tmp_path / "r"
    run(out, "train.max_steps=5", "train.checkpoint_async=true", "train.checkpoint_every=1")
    # steps 1-5; at 5 the end of the run and after its final evaluation
    assert len(futures) == 7 and all(f.done() for f in futures)
    assert [p.name for p in rundir.checkpoints_dir(out).iterdir()] == ["step-00000005-7"]
    run(out, "train.max_steps=9", resume=True)
    assert_same(straight, final(out))


def test_a_full_disk_in_a_save_keeps_the_previous_checkpoint(tmp_path, straight, monkeypatch):
    """From the second save on, the disk fills after half of the entries are written."""
    saves = []
    write_data = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        saves.append(plan)
        if len(saves) == 1:
            return write_data(self, plan, planner)
        write_data(self, dataclasses.replace(plan, items=plan.items[:len(plan.items) // 2]),
                   planner).wait()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    out = tmp_path / "r"
    with pytest.raises(FrzooError) as info:
        run(out, "train.max_steps=9")
    message = str(info.value)
    assert f"could not write checkpoint '{out}/checkpoints/.save-000002.tmp' (No space left " \
           f"on device); the previous checkpoint {out}/checkpoints/step-00000004-1 is kept" \
           in message and "\n" not in message
    assert [p.name for p in rundir.checkpoints_dir(out).iterdir()] == ["step-00000004-1"]
    monkeypatch.undo()
    run(out, "train.max_steps=9", resume=True)
    assert_same(straight, final(out))


# ---------------------------------------------------------------- resume with another layout
@pytest.mark.parametrize("change", [["split.points=[layer3]", "algorithm.name=bp"],  # K 3 -> 2
                                    ["split.points=[layer1,layer2,layer3,layer4]"]])  # K 3 -> 5
def test_another_layout_carries_weights_and_optimizer_state_exactly(tmp_path, change):
    """The resumed pipeline's weights and per-parameter optimizer state (momentum buffers) are
    the saved ones, tensor by tensor, under the unsplit model's names."""
    out = tmp_path / "r"
    run(out, "train.max_steps=5")
    saved = DcpCheckpoint(rundir.checkpoint_path(out))
    cfg = load_recipe(None, [*TINY, *change, "train.max_steps=9", f"run.out_dir={out}"])
    executor = build(cfg).executor
    executor.load_checkpoint(saved, carry=False)
    now = executor.checkpoint_entries()
    names = [k for k in now if k.startswith(("model/", "optim/"))]
    assert set(names) == set(saved.keys("model/") + saved.keys("optim/"))
    assert any(k.endswith("/momentum_buffer") for k in names)
    before = saved.read_new(names)
    for key in names:
        assert torch.equal(now[key], before[key]), key
    assert all(a.origin == 5 for a in executor.algorithms)  # the warm-up starts afresh at 5


def test_a_resume_with_another_layout_says_the_rule_and_trains_on(tmp_path, caplog):
    out = tmp_path / "r"
    run(out, "train.max_steps=5")
    caplog.set_level("INFO", logger="frzoo")
    summary = run(out, "train.max_steps=9", "split.points=[layer1,layer2,layer3,layer4]",
                  resume=True)
    assert summary["steps"] == 9 and summary["num_parts"] == 5
    assert "resumed step 5 with K=5 (was 3): weights and optimizer state carried; the old " \
           "layout's histories and deltas in flight are dropped and fr restarts its warm-up: " \
           "part k skips its first 5-k updates (docs/checkpoints.md)" in caplog.messages
    caplog.clear()
    run(out, "train.max_steps=11", "split.points=[layer1,layer2,layer3,layer4]",
        "algorithm.name=bp", resume=True)
    assert [m for m in caplog.messages if m.startswith("resumed step 9 with algorithm bp (was "
                                                       "fr): weights and optimizer state")]


# ---------------------------------------------------------------- weights from any run
def test_init_checkpoint_and_export_read_a_run_folder_or_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    run(out, "train.max_steps=3")
    weights = final(out)
    for source in (out, rundir.checkpoint_path(out)):  # a run folder, a checkpoint folder
        cfg = load_recipe(None, [*TINY, f"model.init_checkpoint={source}",
                                 f"run.out_dir={tmp_path / 'new'}"])
        assert_same(weights, build(cfg).pipeline.model.state_dict())
        assert main(["export", str(source), "-o", str(tmp_path / "w.pt")]) == 0
        assert_same(weights, torch.load(tmp_path / "w.pt", weights_only=True))
    assert "step 3; load it with timm.create_model('test_resnet'" in capsys.readouterr().out
