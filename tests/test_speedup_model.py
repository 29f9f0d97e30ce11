"""The R x K against DDP cost model of bench/speedup_model.py (--scale-out), on made-up models."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "speedup_model", Path(__file__).resolve().parent.parent / "bench" / "speedup_model.py")
sm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sm)

BW = (150e9, 25e9)


def made_up(param_bytes: float, forward: float = 1e-3) -> dict:
    """8 equal units, B = 2F, `forward` seconds per sample each, no activation traffic."""
    return {"global_batch": 64, "units": 8, "costs": [(forward, 2 * forward)] * 8,
            "act_bytes": [0.0] * 8, "param_bytes": [param_bytes / 8] * 8, "flops": [1e9] * 8}


def test_ring_all_reduce_and_its_overlap_with_the_backward():
    assert sm.ring_seconds(1e9, 1, 1e9) == 0.0
    assert sm.ring_seconds(1e9, 4, 1e9) == pytest.approx(1.5)  # 2 (n-1)/n
    assert sm.reduced_backward(2.0, 1e9, 4, 1e9, overlap=False) == pytest.approx(3.5)
    tail = sm.ring_seconds(sm.DDP_BUCKET_BYTES, 4, 1e9)
    assert sm.reduced_backward(2.0, 1e9, 4, 1e9, overlap=True) == pytest.approx(2.0 + tail)


def test_without_communication_ddp_wins_by_features_replays_extra_forward():
    m = made_up(0.0)
    ddp = sm.ddp_step(m, 8, BW, 8)
    assert ddp == pytest.approx(64 / 8 * 8 * 3e-3)
    period, cuts = sm.frxdp_step(m, 4, 2, BW, 8, overlap=True)
    # K=2: the best split gives part 1 fewer units (2F + B) than part 2 (F + B)
    assert cuts == [3] and period == pytest.approx(64 / 4 * max(3 * 4e-3, 5 * 3e-3))
    assert period > ddp


def test_across_nodes_a_large_model_favours_r_x_k():
    m = made_up(400e6, forward=1e-5)  # DDP: 31 ms of all-reduce against 1 ms of compute
    out = sm.scale_out({"made_up": m}, [16], [0.0], BW, 8)["as_measured"]["made_up"][16]
    assert out["best_vs_ddp"] > 1 and out["rxk"]["R2xK8"]["vs_ddp"] > \
        out["rxk"]["R2xK8_no_overlap"]["vs_ddp"]
