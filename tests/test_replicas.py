"""Data-parallel replicas of the K-part pipeline (`distributed.replicas`), gloo on CPU with NCCL's
point-to-point rules emulated (tests/support/nccl_emulation.py).

With `distributed.sync_bn: true`, R=2 x K=2 computes what R=1 x K=2 computes on the same global
batch, up to float summation order: the gradient is the sum of two shards' partial sums instead
of one sum over the batch, and BatchNorm's statistics are a sum of per-replica sums (then the
squared deviations, two passes) instead of one kernel's reduction. Those differ in the last bits
and the differences grow with the steps, faster the worse the network is conditioned (here:
BatchNorm over 1x1 maps of 7 or 8 samples in layer4). So the tolerance is measured, not guessed:
the yardstick is the same R=1 run at 2 threads instead of 1 (another summation order, nothing
else), and R=2 must stay within 4 times its spread (at least 2e-5; a spread that would allow more
than 1e-3 fails the test as ill-conditioned). Measured after 20 steps at lr 0.01 (max absolute
difference of the weights): see docs/distributed.md#exactness. Two R=2 runs, and an R=2 run
resumed with R=2, are bit for bit the same.

The data: 39 training samples in batches of 8, so every epoch ends with a batch of 7, split 3/4
between the replicas (uneven shards: the loss weights each by its share); 20 test samples in
batches of 8: replica 0 evaluates batches 0 and 2, replica 1 batch 1. (With 37 samples the last
batch of 5 makes this tiny network ill-conditioned: the 1- and 2-thread R=1 runs already differ
by 0.07 after 10 steps, so no tolerance could tell a bug from summation order there.)
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from frzoo.config import load_recipe
from frzoo.data import build_data, shard_rows
from frzoo.errors import FrzooError, RecipeError
from frzoo.executors.part_state import read_checkpoint
from frzoo.executors.topology import Layout
from frzoo.plan import choose_executor
from frzoo.run import train
from support import AFTER, EMULATION, OVERFLOW, PROBE  # PROBE: small buckets, records collectives

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=39", "data.num_test=20",
        "data.batch_size=8", "data.image_size=16", "train.epochs=4", "train.eval_every=2",
        "train.progress=false", "train.threads=1", "train.log_every=5", "optimizer.lr=0.01",
        "distributed.timeout_s=60", "split.points=[layer3]", f"plugins=[{EMULATION}]"]
REPLICAS = ["distributed.replicas=2", "distributed.sync_bn=true"]
OVERLAPPED = f"plugins=[{EMULATION},{PROBE}]"
AFTER_BACKWARD = f"plugins=[{EMULATION},{PROBE},{AFTER}]"
LR = 0.01  # optimizer.lr in TINY
FLOOR, CEILING = 2e-5, 1e-3  # the tolerance's least value; above it the setup is ill-conditioned


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def weights(path: Path) -> dict:
    return torch.load(path / "final.pt", weights_only=True)


def checkpoint(path: Path) -> dict:
    return read_checkpoint(path)


def probe(folder: Path, monkeypatch) -> Path:
    """Make the next run's processes record their collectives in `folder`
    (tests/support/replica_probe.py)."""
    folder.mkdir()
    monkeypatch.setenv("FRZOO_TEST_PROBE", str(folder))
    return folder


def probed(folder: Path) -> Dict[int, List[dict]]:
    """What each rank recorded, by rank."""
    return {int(f.stem): [json.loads(line) for line in f.read_text().splitlines()]
            for f in folder.glob("*.jsonl")}


def check_collectives(log: Dict[int, List[dict]], algo: str, parts: int = 2) -> None:
    """The copies of each part issue the same collectives on their group, in the same order
    (NCCL's rule), with several gradient buckets a step, launched during the backward (from
    the gradient hooks) wherever the algorithm backpropagates through the live weights: all
    but ddg's parts before the last, which sum after the backward."""
    assert sorted(log) == list(range(2 * parts))
    for k in range(parts):
        group = [k, parts + k]
        ops = [[(r["what"], r["numel"], r["dtype"], r["async"], r["in_backward"])
                for r in log[rank] if r.get("group") == group] for rank in group]
        assert ops[0] and ops[0] == ops[1], f"part {k + 1}: the copies' collectives differ"
        buckets = [op for op in ops[0] if op[0] == "all_reduce" and op[3]]
        assert len({op[1] for op in buckets}) >= 2, f"part {k + 1}: one bucket only"
        early = [op for op in buckets if op[4]]
        if algo == "ddg" and k < parts - 1:
            assert not early, f"part {k + 1}: ddg's hooks cannot fire"
        else:
            assert early, f"part {k + 1}: no bucket was launched during the backward"


def max_diff(a, b, where: str = "", exact: bool = False) -> float:
    """The largest absolute difference of two trees' float tensors; everything else (structure,
    shapes, dtypes, integer tensors, and with `exact` the floats too) must be equal."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), where
            return 0.0
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return max([max_diff(a[k], b[k], f"{where}.{k}", exact) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return max([max_diff(x, y, f"{where}[{i}]", exact) for i, (x, y) in enumerate(zip(a, b))],
                   default=0.0)
    assert a == b, where
    return 0.0


# ---------------------------------------------------------------- no processes
def test_layout_is_replica_major():
    layout = Layout(rank=5, parts=4, replicas=2)
    assert (layout.replica, layout.part, layout.world, layout.leader) == (1, 1, 8, 3)
    assert layout.rank_of(0) == 4 and layout.rank_of(3, replica=0) == 3
    assert layout.name() == "part 2 of replica 1 (rank 5)"
    assert Layout(rank=1, parts=2).name() == "part 2 (rank 1)"


def test_replica_shards_concatenate_to_the_global_batch_augmentation_included():
    cfg = load_recipe(None, [*TINY, "data.augment=standard"])
    data = build_data(cfg.data, cfg.train.seed)
    whole = list(data.train_batches(1, 2))
    shards = [list(data.train_batches(1, 2, replica=r, replicas=2)) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        lo, hi = shard_rows(len(y), 1, 2)
        assert len(y0) == lo and len(y1) == hi - lo
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    tests = [list(data.test_batches(r, 2)) for r in range(2)]
    assert [len(y) for _, y in tests[0]] == [8, 4] and [len(y) for _, y in tests[1]] == [8]


@pytest.mark.parametrize("override,match", [
    ("distributed.replicas=0", r"distributed.replicas=0 must be at least 1"),
    ("data.batch_size=9", r"data.batch_size=9 is the global batch.*multiple of 2"),
    ("executor=local", r"use executor=distributed \(or auto\), not executor=local"),
    ("train.sigma_every=5", r"train.sigma_every .* distributed.replicas=2"),
])
def test_replica_recipe_errors(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, [*TINY, "distributed.replicas=2", override])


def test_devices_take_k_or_k_times_r_entries(tmp_path):
    cfg = load_recipe(None, [*TINY, "distributed.replicas=2", "devices=[cpu,cpu,cpu]"])
    with pytest.raises(FrzooError, match=r"lists 3 devices.*either 2 devices \(every replica uses "
                                         r"them.*or 4 devices, replica-major"):
        train(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_auto_runs_replicas_distributed():
    cfg = load_recipe(None, [*TINY, "distributed.replicas=2"])
    assert choose_executor(cfg) == ("distributed",
                                    "distributed.replicas=2: 2 replicas x 2 parts = 4 processes")


def test_torchrun_world_size_must_be_replicas_times_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FrzooError, match=r"torchrun started 2 processes.*2 parts x 2 replicas.*"
                                         r"4 in all"):
        run(tmp_path / "r", "distributed.replicas=2")


# ---------------------------------------------------------------- R=2 x K=2 against R=1 x K=2
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["fr", "bp", "ddg"])
def test_replicas_equal_one_pipeline_and_repeat_bit_for_bit(tmp_path, monkeypatch, algo):
    """20 steps. One pipeline (local, the reference) against R=2 with sync_bn: float tolerance;
    the R=2 run's collectives checked (check_collectives). R=2 again with every gradient sum
    after the backward (no overlap), stopped at step 10 and resumed with R=2: bit for bit the
    first R=2 run (the overlap changes nothing; a resume neither). Its step-10 checkpoint
    resumed with R=1: float tolerance. (The synchronous schedules: see the next test. With M > 1
    each replica cuts ITS rows into micro-batches, so BatchNorm sees other groups of rows than
    one pipeline's micro-batches do, and R=2 is another computation than R=1, as with DDP.)"""
    name = [f"algorithm.name={algo}"]
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    run(one, *name, "executor=local")
    run(tmp_path / "threads", *name, "executor=local", "train.threads=2")
    # the yardstick: the same run, summing in another order (2 threads) and nothing else
    spread = max_diff(weights(one), weights(tmp_path / "threads"))
    tolerance = max(4 * spread, FLOOR)
    assert tolerance <= CEILING, f"{algo}: 1 and 2 threads differ by {spread}: ill-conditioned"
    log = probe(tmp_path / "probe", monkeypatch)
    summary = run(two, *name, *REPLICAS, OVERLAPPED)
    monkeypatch.delenv("FRZOO_TEST_PROBE")
    check_collectives(probed(log), algo)
    assert summary["num_parts"] == 2 and summary["steps"] == 20
    assert max_diff(weights(one), weights(two), "final.pt") <= tolerance
    a, b = checkpoint(one), checkpoint(two)  # one pipeline's state: histories, mailboxes
    for k, (pa, pb) in enumerate(zip(a["parts"], b["parts"])):
        assert max_diff(pa["model"], pb["model"], f"part {k}") <= tolerance
        assert max_diff(pa["algorithm"], pb["algorithm"], f"part {k}") <= tolerance
        # momentum buffers sum past gradients, i.e. weight changes divided by the lr
        assert max_diff(pa["optimizer"], pb["optimizer"], f"part {k}") <= tolerance / LR
    assert max_diff(a["executor"], b["executor"], "executor") <= tolerance
    reference = a["progress"]["last_eval"]  # sharded evaluation, summed: the whole test set
    assert b["progress"]["last_eval"]["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-3)
    assert b["progress"]["last_eval"]["test_acc1"] == pytest.approx(reference["test_acc1"], abs=5.0)

    run(again, *name, *REPLICAS, AFTER_BACKWARD, "train.max_steps=10")
    shutil.copytree(again, tmp_path / "to_one")
    run(again, *name, *REPLICAS, AFTER_BACKWARD, resume=True)
    max_diff(weights(two), weights(again), "final.pt", exact=True)
    max_diff(checkpoint(two)["parts"], checkpoint(again)["parts"], "parts", exact=True)
    # the checkpoint is one pipeline's: it resumes with another R
    run(tmp_path / "to_one", *name, "distributed.sync_bn=true",
        "executor=local", resume=True)
    assert max_diff(weights(two), weights(tmp_path / "to_one"), "final.pt") <= tolerance
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_fp16_replicas_step_or_skip_together_with_one_scale(tmp_path, monkeypatch):
    """fp16, R=2 x K=2, fr, 10 steps: the last part of replica 1 only overflows at step 4
    (tests/support/fp16_overflow.py). Both copies of part 2 skip step 4, both copies of part 1 skip
    step 5 (replica 0's delta was finite: the summed overflow flag makes it skip), the scale
    halves once, at step 5, and every read of the scalers agrees across the replicas. Again
    with the sums after the backward: bit for bit. Against R=1 (where the whole batch
    overflows): the same skipped steps and scales.

    The weights are not compared with R=1 here: the tolerance rule above does not apply in
    fp16. R=2 rounds each replica's partial weight gradient to fp16 (autocast's backward)
    before the sum, and its BatchNorm outputs to fp16 from another fp32 computation, so its
    steps differ from R=1's by fp16's rounding (measured after one step: up to 7e-4 of the
    update; fp16's unit roundoff is 4.9e-4), which this ill-conditioned network amplifies (max weight difference after
    4 steps: 1.1e-3; after 10: 3.3e-2), while the yardstick, 2 threads instead of 1, reorders
    fp32 sums that fp16 mostly rounds back to the same values (4 steps: 1.2e-7; 10: 1.8e-4)."""
    from test_fp16 import scaling_records, skipped_steps
    fp16 = ["algorithm.name=fr_fp16_overflow", "algorithm.overflow_at=4",
            "algorithm.overflow_rank=3", "train.precision=fp16", "train.loss_scale.init=1024",
            "train.epochs=2", "train.log_every=1"]
    plugins = f"plugins=[{EMULATION},{OVERFLOW},{PROBE}"
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    run(one, *fp16, f"{plugins}]", "executor=local")
    log = probe(tmp_path / "probe", monkeypatch)
    run(two, *fp16, f"{plugins}]", *REPLICAS)
    monkeypatch.delenv("FRZOO_TEST_PROBE")
    run(again, *fp16, f"{plugins},{AFTER}]", *REPLICAS)

    scalers = {rank: [r for r in rows if r["what"] == "scaler"]
               for rank, rows in probed(log).items()}
    assert len(scalers[0]) == 10 and scalers[0] == scalers[2] and scalers[1] == scalers[3]
    records = scaling_records(two)
    assert [skipped_steps(records, k) for k in (1, 2)] == [[5], [4]]
    assert [r["train/loss_scale"] for r in records] == [1024.0] * 5 + [512.0] * 5
    reference = scaling_records(one)
    keys = ("step", "train/loss_scale", "part1/skipped", "part2/skipped")
    assert [{k: r[k] for k in keys} for r in records] == [{k: r[k] for k in keys} for r in reference]
    max_diff(weights(two), weights(again), "final.pt", exact=True)
    max_diff(checkpoint(two)["parts"], checkpoint(again)["parts"], "parts", exact=True)
    assert not multiprocessing.active_children()


def test_checkpoint_shards_of_multi_tensor_cuts_concatenate_and_split_back():
    """A history or mailbox entry of a cut crossed by several tensors is saved as a list (None
    where a tensor has no delta): the replicas' rows join tensor by tensor and split back."""
    from frzoo.executors.shards import concat_shards, shard_tensors
    g = torch.Generator().manual_seed(0)
    whole = [[torch.randn(7, 3, generator=g), None, torch.randn(7, 2, 2, generator=g)],
             torch.randn(7, 4, generator=g)]
    layouts = [Layout(rank=r * 2 + 1, parts=2, replicas=2) for r in range(2)]
    shards = [shard_tensors(whole, layout) for layout in layouts]
    assert shards[0][0][1] is None and shards[0][0][0].shape[0] + shards[1][0][0].shape[0] == 7
    joined = concat_shards(shards)
    assert torch.equal(joined[1], whole[1]) and joined[0][1] is None
    assert all(torch.equal(a, b) for a, b in zip(joined[0][::2], whole[0][::2]))


@pytest.mark.slow(seconds=40)
def test_microbatched_replicas_sum_each_bucket_once_a_step(tmp_path, monkeypatch):
    """1f1b with 2 micro-batches a replica, fp16, R=2 x K=2, 6 steps: the gradient hooks count
    only the last micro-batch's backward (frzoo.executors.gradient_sum.count_from_now), so each
    bucket is all-reduced once a step, during that backward, with the sum of both micro-batches
    (a bucket launched after the first would be stale, and in fp16 an error); the result equals
    the sums after the backward, bit for bit."""
    micro = ["algorithm.name=1f1b", "algorithm.microbatches=2", "train.precision=fp16",
             "data.drop_last=true", "train.max_steps=6", *REPLICAS]
    log = probe(tmp_path / "probe", monkeypatch)
    run(tmp_path / "overlapped", *micro, OVERLAPPED)
    monkeypatch.delenv("FRZOO_TEST_PROBE")
    check_collectives(probed(log), "1f1b")
    for rank, records in probed(log).items():
        sums = [r for r in records if r["what"] == "all_reduce" and r["async"]
                and r.get("group") == [rank % 2, 2 + rank % 2]]
        in_backward = [r for r in sums if r["in_backward"]]
        assert len(sums) % 6 == 0 and len(in_backward) == len(sums), rank  # once, all early
    run(tmp_path / "after", *micro, AFTER_BACKWARD)
    max_diff(weights(tmp_path / "overlapped"), weights(tmp_path / "after"), "final.pt", exact=True)
    assert not multiprocessing.active_children()
