"""Convergence of bp, fr and ddg at K=2 and K=4 on real offline data (the digits), with sigma.

    python bench/convergence_study.py [--recipe recipes/quickstart.yaml] [--out FILE]

Same recipe for every run (the quickstart: timm resnet18, digits upsampled to 32x32, SGD with
Nesterov, cosine schedule, 8 epochs), evaluated every epoch; only `algorithm.name` and `split.k`
change. Sigma is probed every 5 steps (train.sigma_every=5) and averaged per part over the run.
Accuracy numbers do not depend on the machine's load (the runs are deterministic); times do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 95.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--out", default="bench/results/convergence_study.json")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "recipe": args.recipe, "target": TARGET, "runs": {}}
    print("| algorithm | K | epochs to 95% | final acc | best acc | sigma per part (mean) | train s |")
    print("|---|---|---|---|---|---|---|")
    for k in (2, 4):
        for algorithm in ("bp", "fr", "ddg"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                cmd = [sys.executable, "-m", "frzoo.cli", "run", args.recipe, f"algorithm.name={algorithm}",
                       f"split.k={k}", "split.points=null", "devices=null", "train.eval_every=1",
                       "train.sigma_every=5", "train.log_every=5", "train.progress=false",
                       f"run.out_dir={out}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
                summary = json.loads((out / "summary.json").read_text())
            evals = [r for r in records if r["kind"] == "eval"]
            reached = next((r["epoch"] for r in evals if r["test/acc1"] >= TARGET), None)
            sig = []
            for part in range(1, k + 1):
                values = [r[f"part{part}/sigma"] for r in records if f"part{part}/sigma" in r]
                sig.append(statistics.mean(values) if values else None)
            row = {"epochs_to_target": reached, "final_acc1": summary["final_test_acc1"],
                   "best_acc1": summary["best_test_acc1"], "sigma_mean": sig,
                   "train_seconds": summary["train_seconds"],
                   "curve": [(r["epoch"], r["test/acc1"]) for r in evals]}
            results["runs"][f"{algorithm}_k{k}"] = row
            sig_text = ", ".join("-" if s is None else f"{s:.3f}" for s in sig)
            print(f"| {algorithm} | {k} | {reached} | {row['final_acc1']:.2f} | {row['best_acc1']:.2f} | "
                  f"{sig_text} | {row['train_seconds']:.0f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
