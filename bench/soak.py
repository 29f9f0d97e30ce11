"""Soak: many `fr` steps on a tiny model in both executors; memory must stay flat and the
throughput must not decay.

A probe plugin (written next to the run and listed in the recipe's `plugins:`) records, in every
process, at every metrics window (`train.log_every` steps): the step, the resident set size and
the number of live tensors. Images/s come from the run's own metrics.jsonl.

    python bench/soak.py --steps 3000 --log-every 100 --out bench/results/soak.json

tests/test_reliability_soak.py runs the same function for a few hundred steps with a bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

PROBE = '''"""frzoo soak probe: RSS and live tensors of this process at every metrics window."""
import gc, json, os, time, warnings
from pathlib import Path
import torch
from frzoo.executors.local import LocalExecutor
from frzoo.executors.p2p import DistributedExecutor

OUT = Path(__file__).parent


def _rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _probe(cls, clock_of, rank_of):
    original = cls.timing_window

    def timing_window(self):
        self._soak_step = getattr(self, "_soak_step", 0) + clock_of(self).steps
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some module objects warns
            warnings.simplefilter("ignore")
            tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        rank = rank_of(self)
        with open(OUT / f"probe_rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": self._soak_step, "rank": rank, "rss_mb": _rss_mb(),
                                 "tensors": tensors, "t": time.time()}) + "\\n")
        return original(self)
    cls.timing_window = timing_window


_probe(LocalExecutor, lambda ex: ex.clocks[0], lambda ex: 0)
_probe(DistributedExecutor, lambda ex: ex.clock, lambda ex: ex.rank)
'''

# A tiny model at 8x8 images, batch 4, three parts; evaluation and a checkpoint every epoch.
SOAK = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=256", "data.num_test=32",
        "data.batch_size=4", "data.image_size=8", "split.points=[layer2,layer4]",
        "algorithm.name=fr", "train.epochs=100000", "train.progress=false", "train.threads=1",
        "train.eval_every=4", "optimizer.lr=0.01", "distributed.timeout_s=60"]


def soak(executor: str, steps: int, log_every: int, root: Path) -> Dict[str, Any]:
    """Train `steps` steps; return the per-process memory curve and the throughput curve."""
    from frzoo.config import load_recipe
    from frzoo.run import train
    root.mkdir(parents=True, exist_ok=True)
    probe = root / "soak_probe.py"
    probe.write_text(PROBE)
    out = root / "run"
    cfg = load_recipe(None, [*SOAK, f"executor={executor}", f"train.max_steps={steps}",
                             f"train.log_every={log_every}", f"plugins=[{probe}]",
                             f"run.out_dir={out}"])
    start = time.time()
    summary = train(cfg, out)
    wall = time.time() - start
    memory: Dict[int, List[Dict[str, Any]]] = {}
    for path in sorted(root.glob("probe_rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        memory[rows[0]["rank"]] = rows
    speed = [{"step": r["step"], "images_per_s": r["train/images_per_s"]}
             for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    return {"executor": executor, "steps": summary["steps"], "log_every": log_every,
            "wall_s": wall, "memory": memory, "speed": speed}


def verdict(result: Dict[str, Any], warmup: float = 0.25) -> Dict[str, Any]:
    """Growth after the warm-up: RSS (MB) and live tensors per process; speed late vs early."""
    out: Dict[str, Any] = {"rss_growth_mb": {}, "tensor_growth": {}}
    for rank, rows in result["memory"].items():
        settled = [r for r in rows if r["step"] >= warmup * result["steps"]] or rows
        out["rss_growth_mb"][rank] = max(r["rss_mb"] for r in settled) - settled[0]["rss_mb"]
        out["tensor_growth"][rank] = max(r["tensors"] for r in settled) - settled[0]["tensors"]
    speed = [r["images_per_s"] for r in result["speed"] if r["step"] >= warmup * result["steps"]]
    third = max(1, len(speed) // 3)
    early, late = statistics.median(speed[:third]), statistics.median(speed[-third:])
    out.update(images_per_s_early=early, images_per_s_late=late, speed_ratio=late / early)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--executors", default="local,distributed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    results = []
    for executor in args.executors.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(executor, args.steps, args.log_every, Path(tmp))
        result["verdict"] = verdict(result)
        print(json.dumps({"executor": executor, "steps": result["steps"],
                          "wall_s": round(result["wall_s"], 1), **result["verdict"]}),
              file=sys.stderr)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "recipe": SOAK,
                                    "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
