"""fp16 with loss scaling that is correct under staleness (frzoo/loss_scale.py).

- K=1 Features Replay equals backprop bit for bit in fp16, and fp16 backprop equals a plain
  training loop with torch's GradScaler (same scales, same skipped steps, same weights).
- The distributed executor, under NCCL's rules emulated on gloo, equals the local one bit for bit
  (fr, bp, ddg): weights, optimizer state, each part's scaler, each delta's scale, the logged
  scale and skipped steps. The first scale is too large on purpose, so steps overflow, the scale
  backs off and grows again during the test.
- A forced overflow (tests/support/fp16_overflow.py) skips the same steps in the same parts in
  both executors: the last part at step s, the part below at s+1, the next at s+2; the scale halves
  once; the skipped steps leave weights and optimizer state as they were.
- A checkpoint with deltas (and their scales) in flight resumes exactly, in either executor.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F

from frzoo.algorithms.bp import Backprop
from frzoo.config import load_recipe
from frzoo.errors import RecipeError
from frzoo.executors import LocalExecutor
from frzoo.executors.part_state import read_checkpoint
from frzoo.loss_scale import LossScaler
from frzoo.precision import prepare_part
from frzoo.run import build, train
from frzoo.split.chain import Part
from support import EMULATION, OVERFLOW
from test_distributed_nccl_rules import assert_same_tree

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=20", "data.num_test=8",
        "data.batch_size=8", "data.image_size=16", "train.epochs=2", "train.progress=false",
        "train.threads=1", "train.log_every=1", "train.checkpoint_every=5", "optimizer.lr=0.05",
        "optimizer.momentum=0.9", "distributed.timeout_s=30", "train.precision=fp16",
        f"plugins=[{EMULATION},{OVERFLOW}]"]
# 2**17 overflows some parts' fp16 gradients; growing after 2 clean steps overflows again: in 12
# steps the scale goes down and up, and parts skip steps
TOO_LARGE = ["train.loss_scale.init=131072", "train.loss_scale.growth_interval=2",
             "train.epochs=4"]
SPLITS = {2: "split.points=[layer3]", 3: "split.points=[layer2,layer4]"}


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def scaling_records(out: Path) -> List[Dict[str, Any]]:
    """Per step: the loss scale and each part's skipped steps (train.log_every=1)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in ("step", "train/loss", "train/loss_scale")
             or k.endswith("/skipped")} for r in rows if r["kind"] == "train"]


def skipped_steps(records: List[Dict[str, Any]], k: int) -> List[int]:
    """The steps (0-based) at which part k (1-based) skipped its update."""
    return [r["step"] - 1 for r in records if r[f"part{k}/skipped"]]


def checkpoint(out: Path) -> dict:
    return read_checkpoint(out)


def test_fp16_k1_features_replay_equals_fp16_backprop(tmp_path):
    run(tmp_path / "fr", "algorithm.name=fr", *TOO_LARGE)
    run(tmp_path / "bp", "algorithm.name=bp", *TOO_LARGE)
    fr, bp = checkpoint(tmp_path / "fr"), checkpoint(tmp_path / "bp")
    for key in ("model", "optimizer", "loss_scale"):
        assert_same_tree(fr["parts"][0][key], bp["parts"][0][key], key)
    assert scaling_records(tmp_path / "fr") == scaling_records(tmp_path / "bp")
    assert all(v.dtype == torch.float32 for v in fr["parts"][0]["model"].values()
               if v.is_floating_point())  # parameters stay fp32
    records = scaling_records(tmp_path / "fr")
    assert skipped_steps(records, 1) and min(r["train/loss_scale"] for r in records) < 2 ** 17


def test_fp16_backprop_equals_a_training_loop_with_torch_grad_scaler():
    """One part, frzoo's loss scaling against torch.amp.GradScaler on the same model and data:
    the same scale every step, the same skipped steps, the same weights, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))
            for _ in range(12)]

    def sgd(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    part = Part([str(i) for i in range(len(model))], list(model))
    prepare_part(part, torch.device("cpu"), precision="fp16", memory_format="contiguous",
                 compile=False, compile_backend="inductor", is_last=True)
    algo = Backprop(part, sgd(part.parameters()), index=0, num_parts=1,
                    device=torch.device("cpu"), loss_fn=F.cross_entropy)
    algo.scaler = LossScaler(is_last=True, init_scale=2.0 ** 24, growth_interval=2)
    executor = LocalExecutor([algo])

    optimizer = sgd(reference.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=2)
    skipped = 0
    for t, (x, y) in enumerate(data):
        used = scaler.get_scale()
        executor.train_step((x, y), t)
        assert algo.scaler.scale == used, t
        with torch.autocast("cpu", dtype=torch.float16):
            logits = reference(x)
        scaler.scale(F.cross_entropy(logits.float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped += scaler.get_scale() < used  # GradScaler backs off exactly when it skipped
    assert algo.scaler.skipped == skipped > 0
    for a, b in zip([*part.parameters(), *part.buffers()],
                    [*reference.parameters(), *reference.buffers()]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("algo,k", [("fr", 3), ("bp", 2), ("ddg", 2), ("zb1", 3)])
def test_fp16_distributed_under_nccl_rules_equals_local(tmp_path, algo, k):
    local, dist = tmp_path / "local", tmp_path / "dist"
    window = "train.log_every=2"  # records of 2 steps: fewer collectives, a faster test
    name = [f"algorithm.name={algo}"] + (["algorithm.microbatches=2"] if algo == "zb1" else [])
    run(local, SPLITS[k], *name, *TOO_LARGE, window, "executor=local")
    run(dist, SPLITS[k], *name, *TOO_LARGE, window, "executor=distributed")
    assert_same_tree(torch.load(local / "final.pt", weights_only=True),
                     torch.load(dist / "final.pt", weights_only=True), "final.pt")
    a, b = checkpoint(local), checkpoint(dist)
    for key in ("parts", "executor"):  # weights, optimizer state, scalers, deltas and scales
        assert_same_tree(a[key], b[key], key)
    records = scaling_records(local)
    assert records == scaling_records(dist)
    scales = [r["train/loss_scale"] for r in records]
    assert min(scales) < 2 ** 17 and any(y > x for x, y in zip(scales, scales[1:]))  # both ways
    assert any(skipped_steps(records, part) for part in range(1, k + 1))
    if algo in ("fr", "ddg"):
        assert len(b["executor"]["delta_scales"][0]) == 1  # a delta in flight, with its scale
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_forced_overflow_skips_the_same_steps_in_both_executors(tmp_path):
    """Overflow in the last part at step 4 (K=3): part 3 skips step 4, part 2 step 5 (it uses
    that delta), part 1 step 6; the scale halves once, at step 5, and no more: the later
    reports are of the old scale. (A scale of 1024 keeps this model's own gradients finite.)"""
    overflow = ["algorithm.name=fr_fp16_overflow", "algorithm.overflow_at=4", SPLITS[3],
                "train.epochs=3", "train.loss_scale.init=1024"]  # no overflow of its own
    run(tmp_path / "local", *overflow, "executor=local")
    run(tmp_path / "dist", *overflow, "executor=distributed")
    records = scaling_records(tmp_path / "local")
    assert records == scaling_records(tmp_path / "dist")
    assert [skipped_steps(records, k) for k in (1, 2, 3)] == [[6], [5], [4]]
    assert [r["train/loss_scale"] for r in records] == [1024.0] * 5 + [512.0] * 4
    assert_same_tree(checkpoint(tmp_path / "local")["parts"], checkpoint(tmp_path / "dist")["parts"])


def test_skipped_steps_leave_weights_and_optimizer_state_unchanged():
    cfg = load_recipe(None, [*TINY, SPLITS[3], "algorithm.name=fr_fp16_overflow",
                             "algorithm.overflow_at=4", "train.loss_scale.init=1024",
                             "data.num_train=64", "executor=local"])
    job = build(cfg)
    executor = job.executor
    skip = {6: 0, 5: 1, 4: 2}  # step -> the part (index) that skips it
    for step, batch in enumerate(job.data.train_batches(0)):
        before = [copy.deepcopy((a.part.state_dict(), a.optimizer.state_dict()))
                  for a in executor.algorithms]
        executor.train_step(batch, step)
        for index, algo in enumerate(executor.algorithms):
            params = {n: p for n, p in algo.part.named_parameters()}
            unchanged = all(torch.equal(p, before[index][0][n]) for n, p in params.items())
            if skip.get(step) == index:
                assert unchanged, (step, index)
                assert_same_tree(algo.optimizer.state_dict()["state"], before[index][1]["state"])
            elif step >= 2 - index:  # past its warm-up, every other step updates the part
                assert not unchanged, (step, index)
        assert all(p.grad is None for a in executor.algorithms for p in a.part.parameters())


@pytest.mark.slow
def test_an_fp16_checkpoint_resumes_exactly_in_either_executor(tmp_path):
    split = [SPLITS[3], *TOO_LARGE, "train.log_every=3"]
    run(tmp_path / "straight", *split, "train.max_steps=8", "executor=local")
    run(tmp_path / "a", *split, "train.max_steps=4", "executor=distributed")
    run(tmp_path / "a", *split, "train.max_steps=8", "executor=local", resume=True)
    run(tmp_path / "b", *split, "train.max_steps=4", "executor=local")
    run(tmp_path / "b", *split, "train.max_steps=8", "executor=distributed", resume=True)
    straight = checkpoint(tmp_path / "straight")
    for name in ("a", "b"):
        for key in ("parts", "executor"):
            assert_same_tree(straight[key], checkpoint(tmp_path / name)[key], f"{name} {key}")


def test_loss_scale_keys_are_checked():
    load_recipe(None, ["model.name=resnet18", "train.precision=fp16"])  # accepted now
    with pytest.raises(RecipeError, match=r"train.loss_scale.init=0.0 must be positive"):
        load_recipe(None, ["model.name=resnet18", "train.loss_scale.init=0"])
    with pytest.raises(RecipeError, match=r"train.loss_scale.init=inf must be finite"):
        load_recipe(None, ["model.name=resnet18", "train.loss_scale.init=.inf"])
    with pytest.raises(RecipeError, match=r"train.loss_scale.growth_interval=0 must be positive"):
        load_recipe(None, ["model.name=resnet18", "train.loss_scale.growth_interval=0"])
