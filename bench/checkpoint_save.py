"""What a checkpoint save costs each process: its peak resident memory above what it held before
the save, the save's seconds, and the slowest training step around the saves (docs/checkpoints.md).

The CIFAR ResNet-101 recipe at K=4, one process per part on the CPU (`executor=distributed`),
on synthetic 32x32 images of 100 classes (no download) in batches of 8, a checkpoint every 4
steps (and at the end, before and after the final evaluation). A recipe plugin written here wraps `frzoo.trainer.Run.save_checkpoint` and
`Run.train_step` in every process, so the same script measures any frzoo version (run it with
PYTHONPATH set to that version's tree): before each save it resets the process's peak resident
set (`/proc/self/clear_refs`) and reads its resident set; after it, the peak (VmHWM) and the
seconds. Each step's wall seconds are recorded too (the leader's, the last part's, is the
pipeline's period: the slowest of the two steps after each save is "the slowest step around a
save"). Step counts `step` as the trainer does: the save after step index 3 has step 4.

    python bench/checkpoint_save.py --out bench/results/checkpoint_save_after.json
    python bench/checkpoint_save.py --out bench/results/checkpoint_save_async.json --asynchronous
    PYTHONPATH=/path/to/frzoo-before python bench/checkpoint_save.py --out ..._before.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

PROBE = '''
"""Records, per process, what each checkpoint save and each step cost (bench/checkpoint_save.py)."""
import json, os, time
from pathlib import Path
import frzoo.trainer as trainer

OUT = Path(os.environ["FRZOO_BENCH_OUT"])
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

def record(**row):
    with open(OUT / f"{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\\n")

_save = trainer.Run.save_checkpoint
def save_checkpoint(self):
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again here
    before, start = status("VmRSS"), time.perf_counter()
    _save(self)
    record(kind="save", leader=self.executor.is_leader, step=self.progress["step"],
           rss_before=before, peak=status("VmHWM"), seconds=time.perf_counter() - start,
           part=[a.index for a in self.executor.algorithms])
trainer.Run.save_checkpoint = save_checkpoint

_step = trainer.Run.train_step
def train_step(self, step, batch, *, stop):
    start = time.perf_counter()
    out = _step(self, step, batch, stop=stop)
    record(kind="step", leader=self.executor.is_leader, step=step,
           seconds=time.perf_counter() - start)
    return out
trainer.Run.train_step = train_step
'''

RECIPE = ["recipes/cifar100_resnet101.yaml", "devices=[cpu,cpu,cpu,cpu]", "executor=distributed",
          "data.name=synthetic", "data.num_train=64", "data.num_test=8", "data.batch_size=8",
          "data.download=false", "train.epochs=1", "train.eval_every=0", "train.log_every=4",
          "train.progress=false", "train.threads=1", "distributed.timeout_s=600"]


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    saves = [r for r in rows if r["kind"] == "save"]
    steps = [r for r in rows if r["kind"] == "step"]
    mib = 2 ** 20
    by_part: Dict[str, Any] = {}
    for row in saves:
        key = "leader" if row["leader"] else f"part {row['part'][0] + 1}"
        entry = by_part.setdefault(key, {"rise_mib": [], "seconds": []})
        entry["rise_mib"].append(round((row["peak"] - row["rss_before"]) / mib, 1))
        entry["seconds"].append(round(row["seconds"], 3))
    # the leader's steps: the pipeline's period; "around a save": the two steps after one
    leader = {r["step"]: r["seconds"] for r in steps if r["leader"]}
    saved_at = {r["step"] for r in saves if r["leader"]}
    around = [s for s in leader if s in saved_at or s - 1 in saved_at]
    ordered = sorted(leader.values())
    return {"saves": by_part, "leader_step_seconds": {
        "median": round(ordered[len(ordered) // 2], 3),
        "slowest_around_a_save": round(max(leader[s] for s in around), 3) if around else None,
        "slowest_elsewhere": round(max((v for s, v in leader.items() if s not in around),
                                       default=0.0), 3),
        "by_step": {s: round(v, 3) for s, v in sorted(leader.items())}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="train.checkpoint_every")
    parser.add_argument("--asynchronous", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "probe.py").write_text(PROBE)
        records = folder / "records"
        records.mkdir()
        extra = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.every}",
                 f"plugins=[{folder / 'probe.py'}]", f"run.out_dir={folder / 'run'}"]
        if args.asynchronous:
            extra.append("train.checkpoint_async=true")
        subprocess.run([sys.executable, "-m", "frzoo.cli", "run", *RECIPE, *extra], check=True,
                       env={**os.environ, "FRZOO_BENCH_OUT": str(records)})
        rows = [json.loads(line) for f in records.glob("*.jsonl")
                for line in f.read_text().splitlines()]
    result = {"command": " ".join(sys.argv), "recipe": RECIPE, "asynchronous": args.asynchronous,
              **summarize(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
