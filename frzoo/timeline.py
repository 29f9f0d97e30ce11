"""The timeline of a run (`train.trace`): where every part spends its time, step by step.

While the steps of the trace window run, every part records a *span* (name, begin, end) for each
phase its algorithm times (``forward``, ``replay``, ``backward``, ``input_gradient``,
``weight_gradient``, ``optimizer``: whatever name reaches ``PartAlgorithm.timed``) and for the
transport's own work (``send``: packing and posting a message; ``wait``: waiting for a
receive). What no span covers is idle: the bubbles. Each span's args hold the step, and any
keyword the phase was timed with (a micro-batch index).

Clocks. On the CPU a span is the host's ``time.perf_counter``; on a GPU two CUDA events on the
part's current stream (the device's time, as PhaseTimer measures it), read only after the
window, so nothing waits for the device on the hot path. Every process converts its spans to
the wall clock (``time.time``): on the CPU by the offset between the two clocks taken when the
window opens, on a GPU from an anchor event recorded then, after one synchronize. The ranks of a
job on one machine share that clock, so their spans line up without a barrier (a barrier at the
window's start would drain the pipeline the trace is meant to show); on several machines they
line up as well as the machines' clocks agree (NTP: about a millisecond).

At the first log point after the window (or at the end of a shorter run) the spans are gathered
to the leader (frzoo.executors: one process, or the control group) and written as one
Chrome/Perfetto trace, ``RUN_DIR/trace.json``: one process per replica, one thread per part,
complete events (``ph: X``) in microseconds from the window's first span. The same names are
``torch.profiler.record_function`` ranges during the window, so a user's own torch.profiler trace
of those steps shows them; outside the window nothing is recorded and nothing is called.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SEND, WAIT = "send", "wait"  # the transport's spans; the algorithms' are the names they time
#: The phases in display order (a plugin's own names follow, in order of appearance).
PHASE_ORDER = ("forward", "replay", "backward", "input_gradient", "weight_gradient",
               "optimizer", SEND, WAIT)


class Spans:
    """One part's spans during the trace window, on its device's clock (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.step: Optional[int] = None  # the step running now (set by Timeline.step)
        self.records: List[Tuple[str, Any, Any, Dict[str, Any]]] = []
        if self.cuda:  # the anchor: on an idle device an event recorded now runs now
            torch.cuda.synchronize(device)
            self.anchor = self._now()
        self.wall0, self.host0 = time.time(), time.perf_counter()
        if self.cuda:
            torch.cuda.synchronize(device)

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def around(self, inner: ContextManager[Any], name: str, args: Dict[str, Any]
               ) -> Iterator[None]:
        """`inner` (the phase's own timing, or nothing), recorded as span `name` and as a
        torch.profiler range of that name."""
        with torch.profiler.record_function(name):
            begin = self._now()
            with inner:
                yield
            end = self._now()
        self.records.append((name, begin, end, {"step": self.step, **args}))

    def read(self) -> List[List[Any]]:
        """[name, begin, end, args] per span, begin and end in wall-clock seconds (a GPU's: waits
        for the last event, once, after the window)."""
        out = []
        for name, begin, end, args in self.records:
            if self.cuda:
                end.synchronize()
                begin = self.wall0 + self.anchor.elapsed_time(begin) / 1000
                end = self.wall0 + self.anchor.elapsed_time(end) / 1000
            else:
                begin, end = self.wall0 + begin - self.host0, self.wall0 + end - self.host0
            out.append([name, begin, end, args])
        return out


@dataclass(frozen=True)
class Window:
    """The traced steps: start .. start + steps - 1 (0-based step indices)."""
    start: int
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    def covers(self, step: int) -> bool:
        return self.start <= step < self.end


class Timeline:
    """The trainer's component for `train.trace`: opens the window, gives each step its number,
    and writes trace.json once the window is over. The executor supplies the parts of this
    process (``timed_parts()``: replica, algorithm and timers of each) and gathers them
    (``gather_trace``, collective)."""

    def __init__(self, window: Window, executor: Any, path: Path) -> None:
        self.window, self.executor, self.path = window, executor, path
        self.tracks: List[Tuple[Any, Spans]] = []  # (TimedPart, its spans)
        self.entered = self.written = False  # the same on every process: they run the same steps

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Run step `step`, recorded when the window covers it."""
        if not self.window.covers(step):
            yield
            return
        if not self.entered:  # the window opens (or a resumed run enters it)
            self.entered = True
            self.tracks = [(part, Spans(part.algo.device)) for part in self.executor.timed_parts()]
        self._attach(step)
        try:
            yield
        finally:
            self._attach(None)

    def _attach(self, step: Optional[int]) -> None:
        for part, spans in self.tracks:
            spans.step = step
            for timer in part.timers:
                timer.spans = spans if step is not None else None

    def due(self, step: int, last: bool = False) -> bool:
        """Whether to write now, at a point every process reaches at the same `step`: the window
        is over (or the run ends inside it) and this start of the run entered it."""
        return self.entered and not self.written and (step >= self.window.end or last)

    def write(self, leader: bool, about: Dict[str, Any]) -> None:
        """Gather every part's spans (collective) and, on the leader, write the trace."""
        mine = [{"replica": part.replica, "part": part.algo.index, "device": str(spans.device),
                 "spans": spans.read()} for part, spans in self.tracks]
        gathered = self.executor.gather_trace(mine)
        self.written, self.tracks = True, []
        if leader and gathered is not None:
            tracks = [t for rows in gathered for t in rows]
            doc = chrome_trace(tracks, {**about, "steps": [self.window.start, self.window.end]})
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(doc) + "\n")
            os.replace(tmp, self.path)


def chrome_trace(tracks: Sequence[Dict[str, Any]], about: Dict[str, Any]) -> Dict[str, Any]:
    """The Chrome/Perfetto trace of `tracks` (each: replica, part, device, spans in wall-clock
    seconds): pid = replica + 1, tid = part + 1 (parts counted from 1, as in the paper), times in
    microseconds from the earliest span."""
    t0 = min((s[1] for t in tracks for s in t["spans"]), default=0.0)
    events: List[Dict[str, Any]] = []
    for replica in sorted({t["replica"] for t in tracks}):
        events += [{"name": "process_name", "ph": "M", "pid": replica + 1,
                    "args": {"name": f"replica {replica + 1}"}},
                   {"name": "process_sort_index", "ph": "M", "pid": replica + 1,
                    "args": {"sort_index": replica}}]
    for t in sorted(tracks, key=lambda t: (t["replica"], t["part"])):
        pid, tid = t["replica"] + 1, t["part"] + 1
        events += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                    "args": {"name": f"part {tid} ({t['device']})"}},
                   {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                    "args": {"sort_index": tid}}]
        for name, begin, end, args in sorted(t["spans"], key=lambda s: s[1]):
            ts, stop = round((begin - t0) * 1e6, 3), round((end - t0) * 1e6, 3)
            events.append({"name": name, "cat": "phase", "ph": "X", "pid": pid, "tid": tid,
                           "ts": ts, "dur": round(max(stop - ts, 0.0), 3), "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"frzoo": {**about, "wall_clock_start": t0,
                                    "clock": "time.time of each rank (module frzoo.timeline)"}}}


@dataclass
class Track:
    """One row of a trace as read back: a part of a replica and its spans (microseconds)."""
    replica: int
    part: int
    name: str
    spans: List[Tuple[str, float, float]]  # (name, begin, end)


def read_tracks(doc: Dict[str, Any]) -> List[Track]:
    """The rows of a trace written by :func:`chrome_trace`, ordered by replica and part, each
    named by its thread (and replica, where there are several)."""
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc.get("traceEvents", [])
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    rows: Dict[Tuple[int, int], Track] = {}
    for e in doc.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        key = (int(e["pid"]), int(e["tid"]))
        row = rows.setdefault(key, Track(key[0], key[1], names.get(key, f"part {key[1]}"), []))
        row.spans.append((str(e["name"]), float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    if len({pid for pid, _ in rows}) > 1:  # several replicas: say which
        for (pid, _), row in rows.items():
            row.name = f"replica {pid} {row.name}"
    return [rows[k] for k in sorted(rows)]


def phase_names(tracks: Sequence[Track]) -> List[str]:
    """Every span name in the tracks, the known phases first in PHASE_ORDER."""
    seen = list(dict.fromkeys(name for t in tracks for name, _, _ in t.spans))
    return [p for p in PHASE_ORDER if p in seen] + [n for n in seen if n not in PHASE_ORDER]


def shares(tracks: Sequence[Track]) -> List[Dict[str, float]]:
    """Per track, the share of the traced time (the first span's start to the last span's end,
    over every track) in each span name, and `idle`, what no span covers."""
    begin = min((b for t in tracks for _, b, _ in t.spans), default=0.0)
    length = max(max((e for t in tracks for _, _, e in t.spans), default=0.0) - begin, 1e-9)
    out = []
    for track in tracks:
        row: Dict[str, float] = {}
        for name, b, e in track.spans:
            row[name] = row.get(name, 0.0) + (e - b) / length
        row["idle"] = max(0.0, 1.0 - sum(row.values()))
        out.append(row)
    return out
