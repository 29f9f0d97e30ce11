"""What `train.trace` costs: steps/s of the quickstart recipe with the timeline on and off.

Three measures (docs/benchmarks.md, "The cost of train.trace"):

1. per call: a timed block (``PartAlgorithm.timed``'s PhaseTimer) with the timeline off, and on
   (a span and a torch.profiler range besides the seconds), in microseconds; nothing else runs;
   and, interleaved, the PhaseTimer of `--before` (a commit before train.trace) against today's
   with the timeline off;
2. paired steps: recipes/quickstart.yaml's parts built once (local executor, 2 threads), then
   `--pairs` pairs of steps, one step of each pair recorded (the timeline's spans attached to
   every timer, as the window does) and one not, in alternating order; the median over the
   pairs of the ratio of their wall times (and CPU times). Neighbouring steps see nearly the
   same machine, so the median holds up on a busy one better than whole runs do;
3. whole runs (`--runs`): recipes/quickstart.yaml, cut to `--steps` steps, with
   `train.trace={start: WARMUP, steps: STEPS - WARMUP}` and without, in `--rounds` interleaved
   rounds (off, on, off, on ...), each a whole run in this process, with
   each executor in `--executors`. The figure is the steps/s of the traced steps: the training
   seconds between the log points at WARMUP and at STEPS (metrics.jsonl's time/train_s), so
   start-up, the first steps and writing trace.json (after the window's last step) are left out.

    python bench/trace_overhead.py /tmp/trace-overhead --pairs 60            # 1 and 2
    python bench/trace_overhead.py /tmp/trace-overhead --pairs 0             # 1 only
    python bench/trace_overhead.py /tmp/trace-overhead --runs --rounds 3     # 1 and 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from frzoo.algorithms.base import PhaseTimer
from frzoo.config import load_recipe
from frzoo.messages import show_on_stderr
from frzoo.run import build, train
from frzoo.timeline import Spans

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def block_us(make: Callable[[], Any], calls: int) -> float:
    """Microseconds per empty `with make():` block."""
    start = time.perf_counter()
    for _ in range(calls):
        with make():
            pass
    return (time.perf_counter() - start) / calls * 1e6


def best_of(blocks: Dict[str, Callable[[], Any]], calls: int = 20000,
            repeats: int = 5) -> Dict[str, float]:
    """`block_us` of each, interleaved, the best of `repeats`: the least disturbed by whatever
    else the machine runs."""
    out: Dict[str, float] = {}
    for _ in range(repeats):
        for name, make in blocks.items():
            took = block_us(make, calls)
            out[name] = min(out.get(name, took), took)
    return out


def per_call() -> Dict[str, float]:
    """Microseconds per timed empty block, the timeline off and on, and per empty
    torch.profiler.record_function range alone (`range`)."""
    off, on = PhaseTimer(torch.device("cpu")), PhaseTimer(torch.device("cpu"))
    on.spans = Spans(torch.device("cpu"))
    return best_of({"off": lambda: off("forward"), "on": lambda: on("forward"),
                    "range": lambda: torch.profiler.record_function("forward")})


def per_call_before(commit: str) -> Dict[str, float]:
    """Microseconds per timed empty block: the PhaseTimer of `commit` (before train.trace) and
    today's with the timeline off, interleaved."""
    source = subprocess.run(["git", "show", f"{commit}:frzoo/algorithms/base.py"], check=True,
                            capture_output=True, text=True, cwd=RECIPE.parents[1]).stdout
    code = source[source.index("class PhaseTimer:"):source.index("def step_seed")]
    scope: Dict[str, Any] = {}
    exec("import contextlib, time\nimport torch\nfrom typing import *\n" + code, scope)
    before, now = scope["PhaseTimer"](torch.device("cpu")), PhaseTimer(torch.device("cpu"))
    return best_of({"before": lambda: before("forward"), "off": lambda: now("forward")})


def paired_steps(pairs: int) -> Dict[str, List[float]]:
    """Per pair of neighbouring steps (one recorded, one not, in alternating order): the ratio
    recorded/unrecorded of their wall times and of their CPU times (this process's), and the
    unrecorded step's wall time and the recorded step's spans."""
    cfg = load_recipe(RECIPE, ["executor=local"])
    torch.set_num_threads(cfg.train.threads)
    run = build(cfg)
    parts, executor = run.executor.timed_parts(), run.executor
    out: Dict[str, List[float]] = {"wall": [], "cpu": [], "off_s": [], "spans": []}
    pair: Dict[str, tuple] = {}
    step, epoch = 0, 0
    while len(out["wall"]) < pairs:
        for batch in executor.batches(run.data, epoch, 0):
            # steps 0 and 1 warm up; then (off, on), (on, off), (off, on) ...
            state = "on" if step >= 2 and (step + step // 2) % 2 else "off"
            spans = [Spans(part.algo.device) if state == "on" else None for part in parts]
            for part, mine in zip(parts, spans):
                for timer in part.timers:
                    timer.spans = mine
            wall, cpu = time.perf_counter(), time.process_time()
            executor.train_step(batch, step)
            pair[state] = (time.perf_counter() - wall, time.process_time() - cpu,
                           sum(len(s.records) for s in spans if s is not None))
            step += 1
            if step >= 2 and step % 2 == 0 and len(pair) == 2:
                out["wall"].append(pair["on"][0] / pair["off"][0])
                out["cpu"].append(pair["on"][1] / pair["off"][1])
                out["off_s"].append(pair["off"][0])
                out["spans"].append(pair["on"][2])
            if step % 2 == 0:
                pair = {}
            if len(out["wall"]) >= pairs:
                break
        epoch += 1
    return out


def traced_steps_per_s(out: Path, executor: str, steps: int, warmup: int, trace: bool) -> float:
    """Steps/s between the log points at `warmup` and `steps` of one quickstart run."""
    extra = [f"train.max_steps={steps}", f"train.log_every={warmup}", "train.progress=false",
             "train.eval_every=0", f"executor={executor}", f"run.out_dir={out}"]
    if trace:
        extra.append(f"train.trace={{start: {warmup}, steps: {steps - warmup}}}")
    train(load_recipe(RECIPE, extra), out)
    seconds = {r["step"]: r["time/train_s"] for r in map(json.loads, open(out / "metrics.jsonl"))
               if r["kind"] == "train"}
    assert (out / "trace.json").exists() == trace
    return (steps - warmup) / (seconds[steps] - seconds[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a folder for the runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--executors", default="local,distributed")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--runs", action="store_true", help="whole runs instead of paired steps")
    parser.add_argument("--before", default="f21ef97",
                        help="a commit before train.trace, whose PhaseTimer is timed too")
    args = parser.parse_args()
    show_on_stderr()
    calls = per_call()
    print(f"per timed block: {calls['off']:.2f} us off, {calls['on']:.2f} us on; "
          f"{calls['range']:.2f} us per record_function range alone")
    before = per_call_before(args.before)
    print(f"per timed block, interleaved: {before['before']:.2f} us at {args.before}, "
          f"{before['off']:.2f} us now with the timeline off")
    if not args.runs:
        if not args.pairs:  # --pairs 0: the per-call costs only
            return
        got = paired_steps(args.pairs)
        med = {k: statistics.median(v) for k, v in got.items()}
        estimate = med["spans"] * (calls["on"] - calls["off"]) * 1e-6 / med["off_s"]
        quartiles = statistics.quantiles(got["wall"], n=4)
        print(f"{args.pairs} pairs of steps: median unrecorded step {med['off_s']:.3f} s "
              f"({1 / med['off_s']:.2f} steps/s); recorded/unrecorded step time, median of the "
              f"pairs: wall {med['wall']:.4f} (quartiles {quartiles[0]:.3f}, {quartiles[2]:.3f}),"
              f" CPU {med['cpu']:.4f}; {med['spans']:.0f} spans a step: "
              f"{100 * estimate:.4f}% of a step at the per-call cost")
        return
    rates: Dict[str, Dict[str, List[float]]] = {}
    for r in range(args.rounds):
        for executor in args.executors.split(","):
            for trace in (False, True):
                name = "on" if trace else "off"
                rate = traced_steps_per_s(args.out / f"{executor}-{name}-{r}", executor,
                                          args.steps, args.warmup, trace)
                rates.setdefault(executor, {}).setdefault(name, []).append(rate)
                print(f"round {r + 1} {executor} trace {name}: {rate:.3f} steps/s", flush=True)
    for executor, by in rates.items():
        ratios = [on / off for on, off in zip(by["on"], by["off"])]
        print(f"{executor}: off {statistics.median(by['off']):.3f} steps/s, on "
              f"{statistics.median(by['on']):.3f}; on/off per round "
              f"{', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})")


if __name__ == "__main__":  # the spawned workers import this file: run only here
    main()
