"""Exact byte counts of what each algorithm keeps alive (saved tensors + history), on the CPU."""
from __future__ import annotations

import pytest
import torch
from test_engine import batches, make_executor, tiny_model

from frzoo import metrics
from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.config import load_recipe
from frzoo.logging import Logger
from frzoo.run import train

MIB = metrics.MIB


def peaks(cls, **options):
    ex = make_executor(tiny_model(), 3, cls, **options)
    for algo in ex.algorithms:
        algo.measure_memory()
    for t, (x, y) in enumerate(batches(6)):
        ex.train_step((x, y), t)
    return [a.memory_report() for a in ex.algorithms]


def test_features_replay_adds_exactly_its_history_to_backprop():
    bp = peaks(Backprop)
    fr = peaks(FeaturesReplay, replay_bn="twice")  # same BatchNorm saved tensors as backprop
    input_bytes = 6 * 3 * 8 * 8 * 4  # one batch entering part 1
    # part 1 of 3 holds 3 inputs at its peak; the one being replayed is saved by its graph anyway
    assert fr[0]["peak_activation_bytes"] == bp[0]["peak_activation_bytes"] + 2 * input_bytes
    hidden_bytes = 6 * 8 * 8 * 8 * 4  # one batch entering part 2
    assert fr[1]["peak_activation_bytes"] == bp[1]["peak_activation_bytes"] + hidden_bytes
    assert fr[2] == bp[2]  # the last part is plain backprop
    assert fr[0]["params_bytes"] == bp[0]["params_bytes"] > 0
    assert fr[0]["optimizer_bytes"] == bp[0]["optimizer_bytes"] > 0  # momentum buffers


def test_ddg_keeps_k_minus_k_plus_1_graphs():
    bp = peaks(Backprop)
    ddg = peaks(DecoupledBackprop)
    fr = peaks(FeaturesReplay)
    assert ddg[0]["peak_activation_bytes"] > 2.5 * bp[0]["peak_activation_bytes"]
    assert ddg[0]["peak_activation_bytes"] > fr[0]["peak_activation_bytes"]
    assert ddg[2] == bp[2]


def test_memory_in_metrics_and_summary(tmp_path):
    cfg = load_recipe(None, ["model.name=test_resnet", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=8", "data.batch_size=8", "data.image_size=16",
                             "split.points=[layer3]", "train.max_steps=4", "train.log_every=2",
                             "train.progress=false", "train.measure_memory=true",
                             f"run.out_dir={tmp_path}"])
    summary = train(cfg, tmp_path)
    memory = summary["part_memory_bytes"]
    assert len(memory) == 2 and all(m["peak_activation_bytes"] > 0 for m in memory)
    assert "part1/peak_activation_bytes" in (tmp_path / "metrics.jsonl").read_text()


class CudaPeakCounter:
    """torch.cuda's peak counters as the allocator keeps them (this machine has no GPU): the
    peak since the last reset, which a reset brings down to the memory in use."""

    def __init__(self, peaks):
        self.peak = dict(peaks)
        self.in_use = {device: 1 * MIB for device in peaks}
        self.calls = []

    def max_memory_allocated(self, device):
        self.calls.append(("read", str(device)))
        return self.peak[str(device)]

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset", str(device)))
        self.peak[str(device)] = self.in_use[str(device)]


def test_the_cuda_peak_is_read_before_any_reset_and_recorded_under_its_final_name(monkeypatch):
    # The bug this pins down: the timing window reset the counters, and the W&B logger read
    # max_memory_allocated afterwards, so it logged the memory in use rather than the peak
    # (and a second part on the same device read what the first part's reset left).
    counter = CudaPeakCounter({"cuda:0": 300 * MIB, "cuda:1": 40 * MIB})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", counter.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", counter.reset_peak_memory_stats)
    ex = make_executor(tiny_model(), 3, FeaturesReplay)
    for t, (x, y) in enumerate(batches(3)):
        ex.train_step((x, y), t)
    # the window is read as on a machine with parts 1-2 on cuda:0 and part 3 on cuda:1
    for algo, device in zip(ex.algorithms, ("cuda:0", "cuda:0", "cuda:1")):
        algo.device = torch.device(device)
    record = metrics.Window().record(ex.timing_window(), epoch=0.5, lr=0.1, lr_scales=[1, 1, 1],
                                     clock=metrics.RunClock({"train_seconds": 0.0}))
    assert counter.calls == [("read", "cuda:0"), ("read", "cuda:1"),
                             ("reset", "cuda:0"), ("reset", "cuda:1")]
    assert record["part1/max_memory_allocated_mb"] == record["part2/max_memory_allocated_mb"] == 300
    assert record["part3/max_memory_allocated_mb"] == 40
    assert record["part2/peak_allocated_bytes"] == 300 * MIB
    assert record["part1/params_bytes"] > 0  # on CUDA the static bytes come with the peak
    # the next window starts from the reset: its peak is its own
    assert ex.timing_window()[0]["peak_allocated_bytes"] == 1 * MIB


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_of_parts_sharing_a_device(tmp_path):
    class Records(Logger):
        def __init__(self):
            self.train = []

        def log(self, record, step):
            if record["kind"] == "train":
                self.train.append(record)

    records = Records()
    cfg = load_recipe(None, ["model.name=test_resnet", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=8", "data.batch_size=8", "data.image_size=16",
                             "split.points=[layer3]", "devices=[cuda:0,cuda:0]",
                             "train.max_steps=4", "train.log_every=1", "train.progress=false",
                             f"run.out_dir={tmp_path}"])
    train(cfg, tmp_path, loggers=[records])
    for r in records.train:
        peak = r["part1/peak_allocated_bytes"]
        assert r["part2/peak_allocated_bytes"] == peak
        assert r["part1/max_memory_allocated_mb"] == r["part2/max_memory_allocated_mb"] \
            == peak / MIB
        # a step's activations come on top of what the parts hold between steps
        held = sum(r[f"part{k}/{key}"] for k in (1, 2)
                   for key in ("params_bytes", "optimizer_bytes"))
        assert peak > held
