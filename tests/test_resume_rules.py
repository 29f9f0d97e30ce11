"""What may change on resume, and the refusals that come before anything starts.

- Keys that do not change the computation may change on resume (frzoo.checkpoint
  RESUMABLE_CHANGES): the fix a stall's message recommends (`distributed.timeout_s`) and how the
  processes connect (`master_addr`, `master_port`, `backend`) among them; a resumed run with them
  changed equals an uninterrupted one bit for bit. A refused change is refused before any
  process is spawned (frzoo.preflight.check_resume).
- The algorithm never changes on resume: the message says so, naming the key and both values.
- A run folder without recipe.yaml resumes with the recipe its checkpoint holds, and says so.
- Changing `distributed.replicas` without `sync_bn` is allowed and said in one line.
- A batch that would give a BatchNorm one row per replica is refused before any process starts
  (frzoo.preflight.check_shards), with the fixes.
"""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import List

import pytest
import torch

from frzoo import preflight, rundir
from frzoo.checkpoint import RESUMABLE_CHANGES
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.run import train

# 6 steps per epoch; a checkpoint at step 4 of the first start (max_steps), 12 steps in all
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=2", "train.progress=false", "train.threads=1", "train.log_every=2",
        "optimizer.lr=0.05", "distributed.timeout_s=30"]
# the case: 67 samples in batches of 8 end each epoch with a batch of 3, split 2/1
ONE_ROW = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=67",
           "data.num_test=32", "data.batch_size=8", "train.threads=1", "train.progress=false",
           "distributed.replicas=2", "train.max_steps=20"]


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(capsys, *args: str) -> tuple:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def test_the_resumable_keys_include_how_processes_connect_and_wait():
    for key in ("distributed.timeout_s", "distributed.master_addr", "distributed.master_port",
                "distributed.backend", "distributed.replicas"):
        assert key in RESUMABLE_CHANGES
    for key in ("distributed.sync_bn", "optimizer.lr", "data.batch_size", "train.seed",
                "train.precision", "train.compile"):  # these change the computation
        assert not any(key.startswith(p) for p in RESUMABLE_CHANGES)


def test_a_stalled_job_resumes_with_the_fix_its_error_recommends_bit_for_bit(tmp_path):
    """The distributed resume with a longer timeout, another port and backend named: equal,
    bit for bit, to the run that never stopped (distributed == local with one thread)."""
    run(tmp_path / "straight")
    out = tmp_path / "r"
    run(out, "train.max_steps=4")
    run(out, "executor=distributed", "distributed.timeout_s=60", "distributed.master_port=0",
        "distributed.master_addr=localhost", "distributed.backend=gloo", resume=True)
    assert_same(final(tmp_path / "straight"), final(out))
    assert not multiprocessing.active_children()


def files_of(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_resume_is_refused_before_any_process_starts(tmp_path):
    out = tmp_path / "r"
    run(out, "train.max_steps=4")
    before = files_of(out / "checkpoints")
    started = time.time()
    with pytest.raises(FrzooError, match=r"optimizer.lr: 0.05 in the checkpoint, 0.1 now"):
        run(out, "executor=distributed", "optimizer.lr=0.1", "distributed.timeout_s=60",
            resume=True)
    assert time.time() - started < 5  # no worker was spawned (each takes ~10 s to import)
    assert not multiprocessing.active_children()
    assert files_of(out / "checkpoints") == before


def test_the_algorithm_may_change_on_resume_and_the_rule_is_said_in_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    run(out, "train.max_steps=4")
    code, err = cli(capsys, "run", "--resume", str(out), "algorithm.name=bp", "train.max_steps=6")
    assert code == 0, err
    assert "frzoo: resumed step 4 with algorithm bp (was fr): weights and optimizer state " \
           "carried; the old layout's histories and deltas in flight are dropped and bp keeps " \
           "no state between steps, so it starts as it would (docs/checkpoints.md)" in err
    assert "Traceback" not in err


def test_a_folder_without_its_recipe_resumes_with_the_checkpoints(tmp_path, capsys):
    run(tmp_path / "straight")
    out = tmp_path / "r"
    run(out, "train.max_steps=4")
    (out / "recipe.yaml").unlink()
    checkpoint = rundir.checkpoint_path(out)
    code, err = cli(capsys, "run", "--resume", str(out), "train.max_steps=12")
    assert code == 0, err
    assert f"{out}/recipe.yaml is missing; the checkpoint holds the run's recipe, so it was " \
           f"written back from {checkpoint} (step 4)" in err
    assert_same(final(tmp_path / "straight"), final(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(capsys, "run", "--resume", str(empty))
    assert code == 2 and "nothing to resume in" in err and "recipe.yaml" in err, err


def test_another_replica_count_without_sync_bn_is_said_in_one_line(tmp_path):
    out = tmp_path / "r"
    run(out, "train.max_steps=4")
    said: List[str] = []
    cfg = load_recipe(None, [*TINY, "distributed.replicas=2", f"run.out_dir={out}"])
    preflight.check_resume(cfg, out, True, said.append)
    assert said == ["resuming with distributed.replicas=2 (was 1) without distributed.sync_bn: "
                    "BatchNorm now normalises over 4 rows per replica instead of 8, so the run "
                    "departs from one that kept 1 by more than float rounding "
                    "(docs/distributed.md)."]
    said.clear()
    preflight.check_resume(load_recipe(None, [*TINY, f"run.out_dir={out}"]), out, True, said.append)
    assert said == []  # the same R: nothing to say


def test_a_one_row_batchnorm_shard_is_refused_before_any_process_starts(tmp_path, capsys):
    out = tmp_path / "r"
    started = time.time()
    code, err = cli(capsys, "run", *ONE_ROW, f"run.out_dir={out}")
    assert code == 2, err
    assert "the last batch of each epoch has 3 rows (67 training samples, data.batch_size=8); " \
           "split over distributed.replicas=2, a replica gets 1 row" in err
    for fix in ("data.drop_last=true", "data.batch_size=10", "distributed.sync_bn=true"):
        assert fix in err
    assert "Traceback" not in err and time.time() - started < 30
    assert not out.exists() and not multiprocessing.active_children()  # nothing started


@pytest.mark.parametrize("extra, refused", [
    ([], True),
    (["data.drop_last=true"], False),
    (["distributed.sync_bn=true"], False),  # statistics over both replicas' rows
    (["distributed.replicas=1", "data.num_train=65"], True),  # one process, a last batch of 1
    (["distributed.replicas=1", "data.num_train=65", "data.image_size=64"], False),  # 2x2 maps
    (["distributed.replicas=1", "data.num_train=65", "model.name=vit_tiny_patch16_224"],
     False),  # no BatchNorm
])
def test_the_shard_rule_refuses_only_a_batchnorm_that_would_see_one_value(extra, refused):
    cfg = load_recipe(None, [*ONE_ROW, *extra])
    if refused:
        with pytest.raises(FrzooError, match="would see one value per channel"):
            preflight.check_shards(cfg)
    else:
        preflight.check_shards(cfg)
