"""Memory of bp, fr and ddg per part, counted exactly, for the paper's CIFAR ResNets.

    python bench/memory_study.py [--models cifar_resnet164:128,cifar_resnet101:32] [--out FILE]

Each configuration runs K+1 training steps (so every history and stored graph is full) with
`train.measure_memory=true` on the CPU, at one thread, and reports per part the peak bytes of
tensors saved for backward plus what the algorithm holds between iterations, and the parameter
and optimizer-state bytes. Totals are over all parts (what K devices hold together); the paper's
Fig. 5 does not say whether its numbers are per GPU or total, so both the total and the largest
part are given. Exact counts, not timings: the machine's load does not change them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PAPER_MIB = {"cifar_resnet164": {"bp": 1754, "fr": {2: 1920, 3: 2065, 4: 2270}, "ddg": {2: 3080, 3: 4367, 4: 5566}},
             "cifar_resnet101": {"bp": 6346, "fr": {2: 6354, 3: 6683, 4: 7095}, "ddg": {2: 9604, 3: 12863, 4: 15763}}}


def measure(model: str, batch: int, algorithm: str, k: int) -> dict:
    from frzoo.pipeline import build_pipeline
    from frzoo.config import load_recipe
    from frzoo.data import build_data
    from frzoo.executors import LocalExecutor
    cfg = load_recipe(None, [f"model.name={model}", "data.name=synthetic", f"data.batch_size={batch}",
                             f"data.num_train={batch * (k + 1)}", "data.num_test=8", "data.image_size=32",
                             "data.augment=none", f"split.k={k}", f"algorithm.name={algorithm}",
                             "train.measure_memory=true", "train.progress=false"])
    data = build_data(cfg.data, 0)
    job = build_pipeline(cfg, data.info)
    executor = LocalExecutor(job.algorithms)
    for step, batch_xy in enumerate(data.train_batches(0, 0)):
        executor.train_step(batch_xy, step)
    parts = [a.memory_report() for a in job.algorithms]
    total = sum(p["peak_activation_bytes"] + p["params_bytes"] + p["optimizer_bytes"] for p in parts)
    return {"parts": parts, "total_bytes": total,
            "max_part_bytes": max(p["peak_activation_bytes"] + p["params_bytes"] + p["optimizer_bytes"]
                                  for p in parts),
            "points": [names[0] for names in job.partition.to_list()[1:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cifar_resnet164:128,cifar_resnet101:32")
    parser.add_argument("--out", default="bench/results/memory_study.json")
    args = parser.parse_args()
    import frzoo_registry  # noqa: F401
    torch.set_num_threads(1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    for spec in args.models.split(","):
        model, batch = spec.split(":")
        rows = {"bp": measure(model, int(batch), "bp", 1)}
        for algorithm in ("fr", "ddg"):
            for k in (2, 3, 4):
                rows[f"{algorithm}_k{k}"] = measure(model, int(batch), algorithm, k)
        base = rows["bp"]["total_bytes"]
        print(f"\n{model}, batch {batch}")
        print("| config | total MiB | / bp | largest part MiB | paper MiB | paper / bp |")
        print("|---|---|---|---|---|---|")
        paper = PAPER_MIB.get(model, {})
        for name, row in rows.items():
            algo, _, kk = name.partition("_k")
            p = paper.get("bp") if algo == "bp" else paper.get(algo, {}).get(int(kk))
            ratio = f"{p / paper['bp']:.2f}" if p and paper else "-"
            print(f"| {name} | {row['total_bytes'] / 2**20:.1f} | {row['total_bytes'] / base:.2f} | "
                  f"{row['max_part_bytes'] / 2**20:.1f} | {p or '-'} | {ratio} |", flush=True)
        results["models"][model] = {"batch": int(batch), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
