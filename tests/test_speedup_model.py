"""The cost models of bench/speedup_model.py on made-up models: R x K against DDP (--scale-out),
and the synchronous pipelines (gpipe, 1f1b, zb1) beside fr and ddg."""
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


# ---------------------------------------------------------------- synchronous pipelines
def test_gpipe_and_1f1b_idle_k_minus_1_of_m_plus_k_minus_1_slots():
    assert sm.bubble_fraction(2, 2) == pytest.approx(1 / 3)
    assert sm.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert sm.bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert sm.gpipe_seconds(3.0, 4, 4) == pytest.approx(21.0)
    # 4 equal parts, F = B = W = 1 s per batch each, M = 4: 7 slots of 0.75 s
    parts = [(1.0, 1.0, 1.0)] * 4
    gpipe = sm.schedule_seconds("gpipe", parts, 4, 4)
    assert gpipe == pytest.approx(5.25) == sm.schedule_seconds("1f1b", parts, 4, 4)
    busy = 4 * 3 / 4  # each part's own work: M micro-batches of (F + B + W) / M
    assert 1 - busy / gpipe == pytest.approx(sm.bubble_fraction(4, 4))


def test_zb1_defers_the_weight_gradient_into_the_bubble():
    parts = [(1.0, 1.0, 1.0)] * 4
    zb1, one_f_one_b = (sm.schedule_seconds(s, parts, 4, 4) for s in ("zb1", "1f1b"))
    assert zb1 == pytest.approx(4 * 0.75 + 3 * 0.25) and zb1 < one_f_one_b
    # F = B = W: ZB-H1's bubble is a third of 1F1B's (Qi et al. 2024, section 2.1)
    assert (zb1 - 3.0) == pytest.approx((one_f_one_b - 3.0) / 3)
    # without a weight gradient to defer, zb1 is 1f1b; the bubble never goes below zero
    assert sm.zb1_seconds(1.0, 2.0, 0.0, 4, 4) == pytest.approx(sm.gpipe_seconds(3.0, 4, 4))
    assert sm.zb1_seconds(1.0, 2.0, 0.5, 4, 4) < sm.gpipe_seconds(3.5, 4, 4)
    assert sm.zb1_seconds(1.0, 1.0, 5.0, 4, 4) == pytest.approx(4 * 7.0)


def test_graphs_and_inputs_each_part_holds():
    held = {s: [sm.activations_held(s, i, 4, 4) for i in range(4)] for s in sm.SCHEDULES}
    assert held["bp"] == held["fr"] == held["gpipe"] == [1.0] * 4
    assert held["1f1b"] == held["zb1"] == [1.0, 0.75, 0.5, 0.25]  # K - k of M micro-batches
    assert held["ddg"] == [4.0, 3.0, 2.0, 1.0]
    assert [sm.activations_held("1f1b", i, 4, 8) for i in range(4)] == [0.5, 0.375, 0.25, 0.125]
    assert [sm.activations_held("1f1b", i, 4, 2) for i in range(4)] == [1.0, 1.0, 1.0, 0.5]
    assert [sm.inputs_held("fr", i, 4) for i in range(4)] == [3, 2, 1, 0]
    assert [sm.inputs_held("gpipe", i, 4) for i in range(4)] == [0] * 4
    with pytest.raises(ValueError, match="zb2"):
        sm.activations_held("zb2", 0, 4, 4)


def test_every_schedule_side_by_side_on_a_made_up_model():
    """8 equal units, F = 1, backward 2 (half of it the input gradient), 10 bytes saved and an
    input of 1 byte each, no transfer time: 24 s per batch on one device."""
    costs, shares, memory = [(1.0, 2.0)] * 8, [0.5] * 8, [(10.0, 1.0, 0.0)] * 8
    out = sm.compare_schedules(costs, shares, [0] * 8, memory, 1e9, 2, 2)
    assert out["bp"]["speedup"] == 1.0 and out["bp"]["peak_activation_bytes"] == 80.0
    assert out["ddg"]["speedup"] == pytest.approx(2.0) and out["ddg"]["cuts"] == [4]
    assert out["fr"]["cuts"] == [3] and out["fr"]["speedup"] == pytest.approx(24 / 15)
    assert out["gpipe"]["speedup"] == pytest.approx(24 / 18) == out["1f1b"]["speedup"]
    assert out["zb1"]["speedup"] == pytest.approx(24 / 14)  # 2 * 6 + 1 * (2 + 2 - 2)
    assert out["fr"]["activation_bytes"] == [31.0, 50.0]  # 3 units + 1 stale input; 5 units
    assert out["ddg"]["activation_bytes"] == [81.0, 40.0]
    assert out["gpipe"]["activation_bytes"] == [40.0, 40.0]  # both micro-batches on both parts
    assert out["1f1b"]["activation_bytes"] == [40.0, 20.0]  # the last part: one in flight
    assert sm.compare_schedules(costs, shares, [0] * 8, memory, 1e9, 2, 4)["zb1"][
        "activation_bytes"] == [20.0, 10.0]
