"""What `train.trace` costs: steps/s of the quickstart recipe with the timeline on and off.

Three measures (docs/benchmarks.md, "The cost of train.trace"):

1. per call: a timed block (``PartAlgorithm.timed``'s PhaseTimer) with the timeline off, and on
   (a span and a torch.profiler range besides the seconds), in microseconds; nothing else runs;
2. paired steps: recipes/quickstart.yaml's parts built once (local executor, 2 threads), then
   `--pairs` pairs of steps, one step of each pair recorded (the timeline's spans attached to
   every timer, as the window does) and one not, in alternating order; the ratio of the summed
   step times. Neighbouring steps see the same machine, so this holds on a busy machine too;
3. whole runs (`--runs`): recipes/quickstart.yaml (resnet18 on digits, K=2, fr, batch 64, 2 threads), cut to
   `--steps` steps, with `train.trace={start: WARMUP, steps: STEPS - WARMUP}` and without, in
   `--rounds` interleaved rounds (off, on, off, on ...), each a whole run in this process, with
   each executor in `--executors`. The figure is the steps/s of the traced steps: the training
   seconds between the log points at WARMUP and at STEPS (metrics.jsonl's time/train_s), so
   start-up, the first steps and writing trace.json (after the window's last step) are left out.

    python bench/trace_overhead.py /tmp/trace-overhead --pairs 40            # 1 and 2
    python bench/trace_overhead.py /tmp/trace-overhead --runs --rounds 3     # 1 and 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from frzoo.algorithms.base import PhaseTimer
from frzoo.config import load_recipe
from frzoo.messages import show_on_stderr
from frzoo.run import build, train
from frzoo.timeline import Spans

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def per_call(calls: int = 20000, repeats: int = 5) -> Dict[str, float]:
    """Microseconds per timed empty block, the timeline off and on (the best of `repeats`:
    the least disturbed by whatever else the machine runs)."""
    timer = PhaseTimer(torch.device("cpu"))
    out: Dict[str, float] = {}
    for _ in range(repeats):
        for state in ("off", "on"):
            timer.spans = Spans(torch.device("cpu")) if state == "on" else None
            start = time.perf_counter()
            for _ in range(calls):
                with timer("forward"):
                    pass
            took = (time.perf_counter() - start) / calls * 1e6
            out[state] = min(out.get(state, took), took)
    return out


def paired_steps(pairs: int) -> Dict[str, float]:
    """Seconds of the recorded and of the unrecorded steps, summed over `pairs` pairs, and the
    spans the recorded steps made (`spans`)."""
    cfg = load_recipe(RECIPE, ["executor=local"])
    torch.set_num_threads(cfg.train.threads)
    run = build(cfg)
    parts, executor = run.executor.timed_parts(), run.executor
    seconds = {"off": 0.0, "on": 0.0, "spans": 0.0}
    step, epoch = 0, 0
    while step < 2 * pairs + 2:
        for batch in executor.batches(run.data, epoch, 0):
            # steps 0 and 1 warm up; then (off, on), (on, off), (off, on) ...
            state = "on" if step >= 2 and (step + step // 2) % 2 else "off"
            for part in parts:
                spans = Spans(part.algo.device) if state == "on" else None
                for timer in part.timers:
                    timer.spans = spans
            start = time.perf_counter()
            executor.train_step(batch, step)
            if step >= 2:
                seconds[state] += time.perf_counter() - start
            seconds["spans"] += sum(len(part.timers[0].spans.records) for part in parts
                                    if part.timers[0].spans is not None and state == "on")
            for part in parts:  # the spans of this step only
                if part.timers[0].spans is not None:
                    part.timers[0].spans.records.clear()
            step += 1
            if step >= 2 * pairs + 2:
                break
        epoch += 1
    return seconds


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
    args = parser.parse_args()
    show_on_stderr()
    calls = per_call()
    print(f"per timed block: {calls['off']:.2f} us off, {calls['on']:.2f} us on")
    if not args.runs:
        seconds = paired_steps(args.pairs)
        per_step = seconds["spans"] / args.pairs
        estimate = per_step * (calls["on"] - calls["off"]) * 1e-6 / (seconds["off"] / args.pairs)
        print(f"{args.pairs} pairs of steps: off {args.pairs / seconds['off']:.3f} steps/s, on "
              f"{args.pairs / seconds['on']:.3f} steps/s; on/off step time "
              f"{seconds['on'] / seconds['off']:.4f}; {per_step:.0f} spans a step, i.e. "
              f"{100 * estimate:.3f}% of a step at the per-call cost")
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
