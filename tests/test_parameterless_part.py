"""A part without parameters is a part like any other.

`split.auto` may leave a part with nothing but a pooling, a dropout or a reshape (CoaT, MViTv2,
XCiT at K=4: the bottleneck is elsewhere, so the balance leaves small parts in between). Such a
part still runs its forward, sends its input's gradient down, and steps with the others: its
optimizer has one empty group (frzoo/optim.py). Here test_resnet is cut at [maxpool, layer1], so
part 2 is the max-pooling alone, and every algorithm, both executors (under NCCL's rules
emulated on gloo), checkpoints in flight, fp16 loss scaling and data-parallel replicas run
through it; distributed equals local bit for bit.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from frzoo.config import load_recipe
from frzoo.data import build_data
from frzoo.executors.part_state import read_checkpoint
from frzoo.pipeline import build_pipeline
from frzoo.run import train
from test_distributed_nccl_rules import EMULATION, assert_same_tree

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=20", "data.num_test=12",
        "data.batch_size=8", "data.image_size=16", "train.epochs=2", "train.progress=false",
        "train.threads=1", "train.log_every=2", "train.checkpoint_every=5", "optimizer.lr=0.05",
        "optimizer.momentum=0.9", "distributed.timeout_s=30", f"plugins=[{EMULATION}]",
        "split.points=[maxpool,layer1]"]


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def test_the_middle_part_has_no_parameters_and_an_empty_optimizer():
    cfg = load_recipe(None, TINY)
    job = build_pipeline(cfg, build_data(cfg.data, cfg.train.seed).info)
    assert [list(p.names) for p in job.parts][1] == ["maxpool"]
    assert not list(job.parts[1].parameters())
    middle = job.algorithms[1].optimizer
    assert middle.state_dict()["param_groups"][0]["params"] == []
    middle.step()  # nothing to do, and no error


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [("fr", ()), ("bp", ()), ("ddg", ()),
                                        ("fr", ("train.precision=fp16",))])
def test_distributed_equals_local_bit_for_bit_through_a_part_without_parameters(
        tmp_path, algo, extra):
    local, dist = tmp_path / "local", tmp_path / "dist"
    run(local, f"algorithm.name={algo}", *extra, "executor=local")
    run(dist, f"algorithm.name={algo}", *extra, "executor=distributed")
    final = torch.load(local / "final.pt", weights_only=True)
    assert_same_tree(final, torch.load(dist / "final.pt", weights_only=True), "final.pt")
    a = read_checkpoint(local)
    b = read_checkpoint(dist)
    for key in ("parts", "executor"):  # weights, optimizer state, histories, deltas in flight
        assert_same_tree(a[key], b[key], f"checkpoint {key}")
    assert a["parts"][1]["model"] == {} and a["parts"][1]["optimizer"]["state"] == {}
    if algo != "bp":  # the middle part's delta (its input's gradient) is in flight
        assert [len(m) for m in a["executor"]["mailboxes"]] == [1, 1, 0]
    # the parts around it trained: the first part's weights moved from their initial values
    cfg = load_recipe(None, TINY)
    start = build_pipeline(cfg, build_data(cfg.data, cfg.train.seed).info).parts[0]
    assert not torch.equal(final["conv1.0.weight"], start.original_state_dict()["conv1.0.weight"])
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_checkpoint_resumes_bit_for_bit_and_replicas_run_through_it(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run(whole, "algorithm.name=fr", "executor=local")
    run(halves, "algorithm.name=fr", "executor=local", "train.max_steps=4")
    run(halves, "algorithm.name=fr", "executor=distributed", resume=True)
    assert_same_tree(torch.load(whole / "final.pt", weights_only=True),
                     torch.load(halves / "final.pt", weights_only=True), "final.pt")
    summary = run(tmp_path / "replicas", "algorithm.name=fr", "distributed.replicas=2")
    assert summary["num_parts"] == 3
    assert not multiprocessing.active_children()
