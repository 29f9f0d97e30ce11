"""How split.auto=time behaves on one model: the cut it picks in several runs in a row, each
part's predicted cost under fr's cost model, and how far apart the parts are; with the FLOPs
pick for comparison. One thread, as each worker of a two-process run has.

    python bench/balance_time.py [--model resnet18] [--k 2] [--batch 128] [--runs 3]
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from frzoo.algorithms.fr import FeaturesReplay
from frzoo.split.balance import balance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model(args.model, num_classes=10)
    sample = torch.randn(args.batch, 3, args.size, args.size,
                         generator=torch.Generator().manual_seed(0))
    for by in ["time"] * args.runs + ["flops"]:
        start = time.perf_counter()
        chosen = balance(model, args.k, by=by, algorithm=FeaturesReplay, sample=sample)
        gap = max(chosen.costs) / min(chosen.costs) - 1
        print(f"{by}: points {chosen.points}, parts {100 * gap:.1f}% apart; {chosen.describe()} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
