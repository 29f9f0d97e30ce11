"""Images/s of whole `frzoo run` processes, as a user runs them, against the harness's figure.

    python bench/run_speed.py [--model resnet18] [--rounds 3] [--out FILE]

bench/parallel_speed.py times the steady state of a run (its first window untimed, no
evaluation, a log point every 5 steps). A user times the command. This script runs the command:
fr at K=2 (`split.auto=time`, two one-thread processes, synthetic 32x32 images, batch 128) for
SHORT and for LONG steps in fresh processes and takes the difference of the wall times, so
start-up, planning and the first steps cancel and what remains is LONG - SHORT steps as the run
makes them, every log point, evaluation and checkpoint that falls in them included. Variants:

  harness    what parallel_speed.py's fr rows run: train.log_every=5, train.eval_every=0, no
             epoch end inside the timed steps (no checkpoint, no evaluation)
  defaults   the recipe's defaults: a log point every 10 steps, and an epoch of LONG steps, so
             the run ends with its evaluation (data.num_test images) and epoch-end checkpoint
  eval_end   harness, plus the end-of-run evaluation and checkpoint of the defaults
  log10      harness with train.log_every=10

and, in each round, bp_1thread (plain backprop, one thread, one process, timed inside the
process as in parallel_speed.py) and the machine's ceiling c for two one-thread workers. Each
round runs every configuration once in the order listed; ratios are medians of per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_speed import BATCH, CLASSES, SIZE, ceiling, plain  # noqa: E402

SHORT, LONG = 15, 55
TEST_IMAGES = 1024
VARIANTS: Dict[str, List[str]] = {
    "harness": ["train.log_every=5", "train.eval_every=0"],
    "log10": ["train.log_every=10", "train.eval_every=0"],
    "eval_end": ["train.log_every=5", "train.eval_every=1"],
    "defaults": [],
}


def frzoo_seconds(model: str, steps: int, variant: str) -> float:
    """Wall seconds of one `frzoo run` of `steps` steps (one epoch of LONG steps: the LONG run
    ends its epoch, the SHORT one stops inside it)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "frzoo.cli", "run", f"model.name={model}",
               "data.name=synthetic", f"data.num_train={LONG * BATCH}",
               f"data.num_test={TEST_IMAGES}", f"data.batch_size={BATCH}",
               f"data.image_size={SIZE}", f"data.num_classes={CLASSES}", "data.augment=none",
               "executor=distributed", "split.k=2", "split.auto=time", "algorithm.name=fr",
               "train.threads=1", f"train.max_steps={steps}", "train.progress=false",
               "optimizer.nesterov=true", f"run.out_dir={tmp}/run", *VARIANTS[variant]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="bench/results/run_speed.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    variants = args.variants.split(",")
    rounds: List[Dict[str, float]] = []
    for r in range(args.rounds):
        row = {"bp_1thread": plain(args.model, 1, 10)["images_per_s"],
               "c": ceiling(args.model, 10)["c"]}
        for variant in variants:
            short = frzoo_seconds(args.model, SHORT, variant)
            long = frzoo_seconds(args.model, LONG, variant)
            row[variant] = (LONG - SHORT) * BATCH / (long - short)
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
              file=sys.stderr, flush=True)
    c = statistics.median(r["c"] for r in rounds)
    cs = ", ".join(f"{r['c']:.2f}" for r in rounds)
    lines = [f"ceiling c {c:.2f} (rounds {cs}); "
             f"bp_1thread {statistics.median(r['bp_1thread'] for r in rounds):.1f} img/s", "",
             "| variant | img/s (median) | rounds | x bp_1thread | x c |", "|---|---|---|---|---|"]
    for variant in variants:
        values = [r[variant] for r in rounds]
        ratio = statistics.median(r[variant] / r["bp_1thread"] for r in rounds)
        lines.append(f"| {variant} | {statistics.median(values):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} | {ratio:.2f}x | {ratio / c:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                          "model": args.model, "rounds": rounds}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
