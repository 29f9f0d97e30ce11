"""`train.trace`: the timeline of a few steps as one Chrome/Perfetto trace (frzoo/timeline.py).

`check_trace` is what ui.perfetto.dev and chrome://tracing need of the file, and what frzoo
promises besides: one track per part and replica, named; spans that do not overlap on a track;
each span's step inside the window. tests/test_distributed.py checks a distributed run's trace
with it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Set, Tuple

import pytest
import torch

from frzoo.algorithms.base import PhaseTimer
from frzoo.config import load_recipe
from frzoo.run import train
from frzoo.timeline import PHASE_ORDER, Spans, Timeline, Window, chrome_trace, read_tracks, shares

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48", "data.num_test=8",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=1", "train.log_every=3", "train.progress=false", "train.threads=1"]


def check_trace(path: Path, tracks: Set[Tuple[int, int]], steps: range) -> Dict[str, Any]:
    """The trace at `path` is valid JSON in the Chrome trace event format, with exactly the
    tracks (replica, part) counted from 1, each named, its spans in order and apart, each span
    of a step in `steps`. Returns the document."""
    def no_constant(name: str) -> Any:
        raise AssertionError(f"{path}: {name} is not JSON a trace viewer reads")
    doc = json.loads(path.read_text(), parse_constant=no_constant)
    events = doc["traceEvents"]
    assert doc["displayTimeUnit"] in ("ms", "ns")
    meta = {(e["name"], e["pid"], e.get("tid")): e["args"] for e in events if e["ph"] == "M"}
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["ph"] for e in events} == {"M", "X"}
    assert {(e["pid"], e["tid"]) for e in spans} == tracks
    for pid, tid in tracks:
        assert meta[("process_name", pid, None)]["name"] == f"replica {pid}"
        assert meta[("thread_name", pid, tid)]["name"].startswith(f"part {tid} (")
        row = sorted((e for e in spans if (e["pid"], e["tid"]) == (pid, tid)),
                     key=lambda e: e["ts"])
        for a, b in zip(row, row[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, (a, b)  # microseconds, rounded to ns
    for e in spans:
        assert isinstance(e["name"], str) and e["cat"] == "phase"
        assert isinstance(e["ts"], float) and e["ts"] >= 0 and e["dur"] >= 0
        assert e["args"]["step"] in steps, e
    assert min(e["ts"] for e in spans) == 0.0
    return doc


def test_a_local_run_writes_one_trace_with_a_track_per_part(tmp_path):
    out = tmp_path / "fr"
    train(load_recipe(None, [*TINY, "train.trace={start: 2, steps: 3}", f"run.out_dir={out}"]),
          out)
    doc = check_trace(out / "trace.json", {(1, 1), (1, 2), (1, 3)}, range(2, 5))
    assert doc["otherData"]["frzoo"]["steps"] == [2, 5]
    tracks = read_tracks(doc)
    names = {name for t in tracks for name, _, _ in t.spans}
    assert names == {"forward", "replay", "backward", "optimizer"}  # no transport in one process
    assert {len([s for s in t.spans if s[0] == "forward"]) for t in tracks} == {3}  # one a step
    assert not (out / ".trace.json.tmp").exists() and not list(out.glob(".trace*"))


def test_a_window_past_the_runs_end_writes_nothing_and_says_so(tmp_path, caplog):
    out = tmp_path / "r"
    train(load_recipe(None, [*TINY, "train.max_steps=2", "train.trace.start=5",
                             f"run.out_dir={out}"]), out)
    assert not (out / "trace.json").exists()
    assert "train.trace.start=5 is past this run's last step (1): no trace.json is written. " \
           "Choose a start below 2." in caplog.text


def test_any_phase_name_is_a_span_with_its_args_and_a_profiler_range():
    timer = PhaseTimer(torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as off:
        with timer("forward"):
            pass
    assert "forward" not in {e.name for e in off.events()}  # off: no range, no span
    timer.spans = Spans(torch.device("cpu"))
    timer.spans.step = 7
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as on:
        with timer("weight_gradient", microbatch=3):
            pass
        with timer.span("send", what="delta"):
            pass
    assert {"weight_gradient", "send"} <= {e.name for e in on.events()}
    (name, begin, end, args), (sent, *_, sent_args) = timer.spans.read()
    assert (name, args, sent, sent_args) == ("weight_gradient", {"step": 7, "microbatch": 3},
                                            "send", {"step": 7, "what": "delta"})
    assert begin <= end
    assert set(timer.read()) == {"forward", "weight_gradient"}  # a span alone sums no seconds
    assert "input_gradient" in PHASE_ORDER and "weight_gradient" in PHASE_ORDER


class _NoParts:
    def timed_parts(self) -> list:
        return []


@pytest.mark.parametrize("steps_run, written_at", [(range(0, 10), 6), (range(0, 4), 4),
                                                    (range(7, 10), None)])
def test_the_trace_is_written_once_after_the_window_or_at_a_run_end_inside_it(
        steps_run, written_at, tmp_path):
    """Window 2..4, log points every 3 steps: written at the first log point after it, or at the
    end of a run that stops inside it; a run resumed past it writes nothing."""
    timeline = Timeline(Window(2, 3), _NoParts(), tmp_path / "trace.json")
    written = None
    for step in steps_run:
        with timeline.step(step):
            pass
        count = step + 1
        last = count == steps_run.stop
        if (count % 3 == 0 or last) and timeline.due(count, last) and written is None:
            written, timeline.written = count, True
    assert written == written_at


def test_tracks_of_several_replicas_are_named_by_replica_and_their_shares_add_up():
    span = lambda name, begin, end: [name, begin, end, {"step": 0}]  # noqa: E731
    doc = chrome_trace([{"replica": r, "part": k, "device": "cpu",
                         "spans": [span("forward", 10.0 + k, 10.5 + k), span("wait", 12.0, 12.5)]}
                        for r in (0, 1) for k in (0, 1)], {})
    tracks = read_tracks(doc)
    assert [t.name for t in tracks] == [f"replica {r} part {k} (cpu)" for r in (1, 2)
                                        for k in (1, 2)]
    # the traced time is 10.0 .. 12.5 s: each part forward 0.5 s, wait 0.5 s, idle the rest
    assert shares(tracks) == [pytest.approx({"forward": 0.2, "wait": 0.2, "idle": 0.6})] * 4
