"""How a part computes (frzoo/precision.py): bf16 autocast, channels_last, torch.compile (fp16
and its loss scaling: tests/test_fp16.py).

Exactness as everywhere: K=1 Features Replay equals backprop bit for bit in bf16 too, and the
distributed executor equals the local one in bf16 (a ResNet's activations and deltas cross in
bf16).
Images are 32x32, as for the CIFAR models frzoo targets.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from frzoo import precision
from frzoo.config import load_recipe
from frzoo.precision import prepare_part
from frzoo.run import train

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=40", "data.num_test=16",
        "data.batch_size=8", "data.image_size=32", "train.epochs=1", "train.progress=false",
        "train.threads=1", "train.log_every=5", "optimizer.lr=0.05", "distributed.timeout_s=60"]


def run(out: Path, *extra: str) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out)


def weights(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_k1_features_replay_equals_bf16_backprop_and_differs_from_fp32(tmp_path):
    run(tmp_path / "fr", "train.precision=bf16", "algorithm.name=fr")
    run(tmp_path / "bp", "train.precision=bf16", "algorithm.name=bp")
    run(tmp_path / "fp32", "algorithm.name=bp")
    fr, bp, fp32 = weights(tmp_path / "fr"), weights(tmp_path / "bp"), weights(tmp_path / "fp32")
    floats = [v for v in fr.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)  # parameters stay fp32
    assert all(torch.isfinite(v).all() for v in floats)
    assert same(fr, bp)
    assert not same(bp, fp32)  # bf16 really ran


def test_bf16_distributed_equals_bf16_local(tmp_path):
    split = "split.points=[layer3]"
    run(tmp_path / "local", "train.precision=bf16", split, "executor=local")
    run(tmp_path / "dist", "train.precision=bf16", split, "executor=distributed")
    assert same(weights(tmp_path / "local"), weights(tmp_path / "dist"))


def test_channels_last_k1_features_replay_equals_backprop(tmp_path):
    run(tmp_path / "fr", "train.memory_format=channels_last", "algorithm.name=fr")
    run(tmp_path / "bp", "train.memory_format=channels_last", "algorithm.name=bp")
    run(tmp_path / "plain", "algorithm.name=bp")
    fr, bp, plain = weights(tmp_path / "fr"), weights(tmp_path / "bp"), weights(tmp_path / "plain")
    assert same(fr, bp)
    for key in plain:  # the same maths in another layout: float rounding apart
        torch.testing.assert_close(bp[key], plain[key], rtol=1e-4, atol=1e-5)


def test_compiled_parts_equal_eager_parts_and_compile_a_fixed_set_of_graphs(tmp_path):
    """With dynamo's `eager` backend the captured graphs run the same kernels as eager mode, so
    the run must be bit-identical; and the graphs compiled must not grow with the steps:
    part 1 compiles its play, its replay and its evaluation, part 2 its training and
    evaluation forward, each once (40 samples in batches of 8: no smaller last batch)."""
    split = "split.points=[layer3]"
    run(tmp_path / "eager", split)
    torch._dynamo.reset()  # forget graphs of earlier tests: count this run's alone
    counters.clear()
    run(tmp_path / "short", split, "train.compile=true", "train.compile_backend=eager",
        "train.max_steps=3")
    short = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    run(tmp_path / "compiled", split, "train.compile=true", "train.compile_backend=eager")
    assert same(weights(tmp_path / "eager"), weights(tmp_path / "compiled"))
    assert counters["stats"]["unique_graphs"] == short  # 5 steps compile no more than 3 did
    assert short == 5



def _prepare_bf16(*devices: str) -> None:
    for device in devices:
        prepare_part(torch.nn.Linear(2, 2), torch.device(device), precision="bf16",
                     memory_format="contiguous", compile=False, compile_backend="inductor",
                     is_last=False)


def test_bf16_on_a_cpu_that_emulates_it_warns_once_naming_the_capability(monkeypatch, caplog):
    """AVX2 without AVX512-BF16/AMX runs bf16 50-100x slower than fp32: one line says so."""
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_f": False})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level("WARNING", logger="frzoo"):
        _prepare_bf16("cpu", "cpu", "meta")  # two CPU parts in one process: one line
    lines = [r.getMessage() for r in caplog.records if r.name == "frzoo"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "train.precision=bf16 on a CPU without bf16 instructions (torch reports CPU " \
           "capability AVX2" in lines[0] and "train.precision=fp32" in lines[0]


def test_bf16_on_a_cpu_with_bf16_instructions_or_off_the_cpu_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "amx_bf16": True})
    with caplog.at_level("WARNING", logger="frzoo"):
        _prepare_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    with caplog.at_level("WARNING", logger="frzoo"):
        _prepare_bf16("meta")  # not a CPU part
        prepare_part(torch.nn.Linear(2, 2), torch.device("cpu"), precision="fp32",
                     memory_format="contiguous", compile=False, compile_backend="inductor",
                     is_last=False)
    assert not [r for r in caplog.records if r.name == "frzoo"]
