"""Exact byte counts of what each algorithm keeps alive (saved tensors + history), on the CPU."""
from __future__ import annotations

from test_engine import batches, make_executor, tiny_model

from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.config import load_recipe
from frzoo.run import train


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
    summary = train(cfg, tmp_path, echo=lambda *_: None)
    memory = summary["part_memory_bytes"]
    assert len(memory) == 2 and all(m["peak_activation_bytes"] > 0 for m in memory)
    assert "part1_peak_activation_bytes" in (tmp_path / "metrics.jsonl").read_text()
