"""The CUDA paths: parts on a GPU in one process, two ranks sharing one GPU over gloo, and NCCL
across two GPUs. Skipped without CUDA (CI has none); bench/gpu_check.sh runs them on a GPU
machine with `pytest -m cuda`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frzoo.config import load_recipe
from frzoo.run import train

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA, reason="needs CUDA (run bench/gpu_check.sh on a GPU)")]

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=64", "data.num_test=16",
        "data.batch_size=16", "data.image_size=32", "train.epochs=1", "train.progress=false",
        "train.log_every=2", "optimizer.lr=0.05", "split.points=[layer3]",
        "distributed.timeout_s=120"]


def run(out: Path, *extra: str) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out)


def finite_weights(out: Path) -> bool:
    state = torch.load(out / "final.pt", weights_only=True)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("extra", [[], ["train.precision=bf16"], ["train.precision=fp16"], ["train.compile=true"],
                                   ["train.memory_format=channels_last", "train.precision=bf16"]])
def test_two_parts_on_one_gpu_in_one_process(tmp_path, extra):
    summary = run(tmp_path / "r", "devices=[cuda:0,cuda:0]", *extra)
    assert summary["executor"] == "local" and finite_weights(tmp_path / "r")
    # phase times come from CUDA events: positive, and no part spends its step in "other"
    shares = summary["part_time_share"]
    assert all(row["forward"] > 0 and row["backward"] > 0 for row in shares)


def test_two_ranks_share_one_gpu_over_gloo(tmp_path):
    summary = run(tmp_path / "r", "devices=[cuda:0,cuda:0]", "executor=distributed",
                  "distributed.backend=gloo")
    assert summary["executor"] == "distributed" and finite_weights(tmp_path / "r")
    assert "wait" in summary["part_time_share"][0]


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL refuses two ranks on one GPU: needs two GPUs")
def test_nccl_across_two_gpus_equals_gloo(tmp_path):
    run(tmp_path / "nccl", "devices=[cuda:0,cuda:1]", "distributed.backend=nccl")
    run(tmp_path / "gloo", "devices=[cuda:0,cuda:1]", "distributed.backend=gloo")
    for path in ("nccl", "gloo"):
        assert finite_weights(tmp_path / path)
    a = json.loads((tmp_path / "nccl" / "summary.json").read_text())
    b = json.loads((tmp_path / "gloo" / "summary.json").read_text())
    assert a["steps"] == b["steps"]


def test_the_timeline_of_gpu_parts_comes_from_cuda_events(tmp_path):
    """train.trace with the parts on a GPU, one process per part (gloo): spans from CUDA events,
    read after the window, on one wall clock; a valid trace with a track per part."""
    from test_timeline import check_trace
    run(tmp_path / "r", "devices=[cuda:0,cuda:0]", "executor=distributed",
        "distributed.backend=gloo", "train.trace.start=1", "train.trace.steps=2")
    doc = check_trace(tmp_path / "r" / "trace.json", {(1, 1), (1, 2)}, range(1, 3))
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] > 0 for e in spans if e["name"] in ("forward", "backward"))
    assert max(e["ts"] + e["dur"] for e in spans) < 60e6  # one clock: the window is seconds
