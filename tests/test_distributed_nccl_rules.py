"""The distributed executor under NCCL's point-to-point rules, emulated on gloo, equals the local one.

gloo matches messages by tag and buffers sends, so a transport whose two sides post a pair's
messages in different orders still works on gloo and deadlocks, or mixes up messages, on NCCL.
tests/support/nccl_emulation.py (a recipe plugin, loaded in every worker) takes both away: tags
are ignored (first in, first out per pair of ranks), a rank's operations with one peer run one at a
time in posting order, and a send completes only once the peer's receive has run. The transport
of frzoo before this test existed fails under it at K=2 (the labels arrive as the activation).

The model has dropout (head) and drop-path (blocks of parts 2..K), checked active below; the
data has a smaller last batch (20 samples, batches of 8) and a smaller last test batch, so the
predicted message shapes change; checkpoints fall inside a run of steps (step 5) and at epoch ends.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from frzoo.executors.part_state import read_checkpoint
from frzoo.pipeline import build_pipeline
from frzoo.config import load_recipe
from frzoo.data import build_data
from frzoo.run import train
from support import EMULATION

TINY = ["model.name=test_resnet", "model.kwargs.drop_block_rate=0.2", "model.kwargs.drop_path_rate=0.3",
        "model.kwargs.zero_init_last=false",
        "data.name=synthetic", "data.num_train=20", "data.num_test=12", "data.batch_size=8",
        "data.image_size=16", "train.epochs=2", "train.progress=false", "train.threads=1",
        "train.log_every=2", "train.checkpoint_every=5", "optimizer.lr=0.05",
        "distributed.timeout_s=30", f"plugins=[{EMULATION}]"]
SPLITS = {2: "split.points=[layer3]", 3: "split.points=[layer2,layer4]",
          4: "split.points=[layer2,layer3,layer4]"}


def run(out: Path, *extra: str) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out)


def assert_same_tree(a, b, where: str = "") -> None:
    """Equal trees; tensors equal exactly, with NaN where the other has NaN (NaN != NaN, and
    an fp16 delta made from an overflow holds NaN: tests/test_fp16.py)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(
            a, b, rtol=0, atol=0, equal_nan=True)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_dropout_and_drop_path_are_active_in_every_part_after_the_first():
    cfg = load_recipe(None, [*TINY, SPLITS[4]])
    data = build_data(cfg.data, cfg.train.seed)
    job = build_pipeline(cfg, data.info)
    h = next(data.train_batches(0))[0]
    for index, part in enumerate(job.parts):
        part.train()
        with torch.no_grad():
            outs = []
            for seed in (1, 1, 2):
                torch.manual_seed(seed)
                outs.append(part(h))
        if index > 0:  # the same seed gives the same masks, another seed other masks
            assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2]), index
        h = outs[0]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["fr", "bp", "ddg"])
def test_distributed_under_nccl_rules_equals_local_bit_for_bit(tmp_path, algo):
    for k in (2, 3, 4):
        local, dist = tmp_path / f"local{k}", tmp_path / f"dist{k}"
        run(local, SPLITS[k], f"algorithm.name={algo}", "executor=local")
        summary = run(dist, SPLITS[k], f"algorithm.name={algo}", "executor=distributed")
        assert_same_tree(torch.load(local / "final.pt", weights_only=True),
                         torch.load(dist / "final.pt", weights_only=True), f"K={k} final.pt")
        a = read_checkpoint(local)
        b = read_checkpoint(dist)
        for key in ("parts", "executor"):  # weights, optimizer state, history, mailboxes
            assert_same_tree(a[key], b[key], f"K={k} checkpoint {key}")
        for key in ("step", "best_test_acc1", "last_eval", "last_eval_step"):
            assert a["progress"][key] == b["progress"][key], (k, key)
        if algo != "bp":
            assert [len(m) for m in b["executor"]["mailboxes"]] == [1] * (k - 1) + [0]
        reference = json.loads((local / "summary.json").read_text())
        assert summary["final_test_acc1"] == reference["final_test_acc1"]
        assert summary["best_test_acc1"] == reference["best_test_acc1"]
        assert summary["executor"] == "distributed" and len(summary["part_time_share"]) == k
        assert "wait" in summary["part_time_share"][0]
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("algo", ["fr", "ddg"])
def test_a_multi_tensor_cut_travels_in_one_message_and_equals_local_bit_for_bit(tmp_path, algo):
    """Cut inside layer2's block (its input and its branch cross) and between blocks: each
    step's activation is one packed message of two tensors, its delta one message of two."""
    # DropBlock branches on its input's values, which torch.fx cannot trace; drop-path stays on
    split = ["split.points=[layer2.0.conv2,layer4]", "model.kwargs.drop_block_rate=0.0"]
    local, dist = tmp_path / "local", tmp_path / "dist"
    run(local, *split, f"algorithm.name={algo}", "executor=local")
    summary = run(dist, *split, f"algorithm.name={algo}", "executor=distributed")
    partition = json.loads((local / "partition.json").read_text())
    shapes = [p["output_shape"] for p in (partition["parts"] if isinstance(partition, dict)
                                          else partition)]
    assert len(shapes[0]) == 2 and isinstance(shapes[0][0], list)  # two tensors cross cut 1
    assert_same_tree(torch.load(local / "final.pt", weights_only=True),
                     torch.load(dist / "final.pt", weights_only=True), "final.pt")
    a = read_checkpoint(local)
    b = read_checkpoint(dist)
    for key in ("parts", "executor"):  # weights, optimizer state, tuple histories, mailboxes
        assert_same_tree(a[key], b[key], f"checkpoint {key}")
    assert [type(d) for box in b["executor"]["mailboxes"] for d in box] == [list, torch.Tensor]
    reference = json.loads((local / "summary.json").read_text())
    assert summary["final_test_acc1"] == reference["final_test_acc1"]
    assert not multiprocessing.active_children()


@pytest.mark.slow(seconds=60)
def test_synchronous_schedules_under_nccl_rules_equal_local_bit_for_bit(tmp_path):
    """gpipe, 1f1b and zb1 at K=2, 3, 4, each with a cut inside layer2's block (two tensors
    cross it): each pair posts its micro-batches' activations and deltas in the order of the
    shared simulation (frzoo.algorithms.actions), which NCCL's rules accept."""
    splits = {2: "split.points=[layer2.0.conv2]", 3: "split.points=[layer2.0.conv2,layer4]",
              4: "split.points=[layer2,layer2.0.conv2,layer4]"}
    for k, algo in ((2, "1f1b"), (3, "zb1"), (4, "gpipe")):
        extra = [splits[k], "model.kwargs.drop_block_rate=0.0", f"algorithm.name={algo}",
                 "algorithm.microbatches=2"]
        local, dist = tmp_path / f"local{k}", tmp_path / f"dist{k}"
        run(local, *extra, "executor=local")
        run(dist, *extra, "executor=distributed")
        assert_same_tree(torch.load(local / "final.pt", weights_only=True),
                         torch.load(dist / "final.pt", weights_only=True), f"{algo} K={k}")
        a, b = read_checkpoint(local), read_checkpoint(dist)
        assert_same_tree(a["parts"], b["parts"], f"{algo} K={k} checkpoint")
    assert not multiprocessing.active_children()
