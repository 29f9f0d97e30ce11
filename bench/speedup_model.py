"""A MODEL (not a measurement) of Features Replay's speedup on K devices for the paper's ResNets.

    python bench/speedup_model.py [--batch 32] [--bandwidth-gbs 10] [--device cpu|cuda] [--out FILE]

Inputs, measured here: each block's forward and backward seconds (train mode, CIFAR-shaped input
at --batch; on one CPU thread, or on the GPU with --device cuda) and each cut's activation size.
Assumed: the link between two devices moves --bandwidth-gbs GB/s (PCIe 3 x16 between GPUs is
about 10-12) and transfers do not overlap compute; with --device cpu, also that a GPU's per-block
time ratios are those of the CPU (a GPU's are flatter at small batches). Per part and iteration, Features Replay costs 2F + B (+ sending
its activation up and its delta down) for every part but the last, F + B for the last; backprop
on one device costs the sum of F + B. The period is the busiest part's cost, so
speedup = sum(F + B) / max_k cost_k, for the authors' split (ceil(n/K) blocks a part) and the
best split for this cost (frzoo's `split.auto=time`). The paper's measured speedups are printed
beside (docs/algorithm.md, "Reported numbers", from the paper's Fig. 4).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

PAPER = {"cifar_resnet164": {2: 1.28, 3: 1.68, 4: 1.95}, "cifar_resnet101": {2: 1.22, 3: 1.42, 4: 1.56}}


def activation_bytes(model: torch.nn.Module, units: List[List[str]], sample: torch.Tensor) -> List[int]:
    """Bytes of the tensor entering each unit (what crosses a cut before it)."""
    sizes = []
    h = sample
    with torch.no_grad():
        for unit in units:
            sizes.append(h.numel() * h.element_size())
            for name in unit:
                h = model.get_submodule(name)(h)
    return sizes


def model_speedups(costs: List[Tuple[float, float]], sizes: List[int], bandwidth: float,
                   cuts_for: Dict[str, List[int]]) -> Dict[str, Dict[str, float]]:
    from frzoo.algorithms.fr import FeaturesReplay
    from frzoo.split.balance import part_cost
    one_device = sum(f + b for f, b in costs)
    out = {}
    for label, cuts in cuts_for.items():
        bounds = [0, *cuts, len(costs)]
        period = 0.0
        for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
            last = b == len(costs)
            transfer = 0.0
            if a > 0:  # receives its input, sends the delta for it back
                transfer += 2 * sizes[a] / bandwidth
            if not last:  # sends its output, receives the delta for it
                transfer += 2 * sizes[b] / bandwidth
            period = max(period, part_cost(costs[a:b], index, len(cuts) + 1, FeaturesReplay)
                         + transfer)
        out[label] = {"speedup": one_device / period, "cuts": cuts}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bandwidth-gbs", type=float, default=10.0)
    parser.add_argument("--models", default="cifar_resnet164,cifar_resnet101")
    parser.add_argument("--device", default="cpu",
                        help="where the per-block times are measured (cpu: one thread; cuda)")
    parser.add_argument("--out", default="bench/results/speedup_model.json")
    args = parser.parse_args()
    import frzoo_zoo  # noqa: F401
    import timm
    from frzoo.algorithms.fr import FeaturesReplay
    from frzoo.split import points_for_k
    from frzoo.split.balance import best_cuts, part_cost, units_of
    from frzoo.split.costs import measure_units
    torch.set_num_threads(1)
    device = torch.device(args.device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch,
               "bandwidth_gbs": args.bandwidth_gbs, "device": str(device), "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).to(device)
        units = units_of(model)
        sample = torch.randn(args.batch, 3, 32, 32, device=device)
        costs = measure_units(model, units, sample, repeats=3)
        sizes = activation_bytes(model, units, sample)
        first = [u[0] for u in units]
        entry: Dict[str, object] = {"units": len(units),
                                    "backward_over_forward": sum(b for _, b in costs) / sum(f for f, _ in costs),
                                    "k": {}}
        for k in (2, 3, 4):
            rule = [first.index(p) if p in first else next(i for i, u in enumerate(units) if p in u)
                    for p in points_for_k(model, k)]
            best = best_cuts(len(units), k, lambda a, b, i: part_cost(costs[a:b], i, k, FeaturesReplay))
            modelled = model_speedups(costs, sizes, args.bandwidth_gbs * 1e9, {"authors_split": rule,
                                                                             "best_split": best})
            entry["k"][k] = {**modelled, "paper_measured": PAPER.get(name, {}).get(k),
                             "ideal_equal_parts": 3 * k / 4, "ideal_best": (3 * k + 1) / 4}
            print(f"{name} K={k}: modelled {modelled['authors_split']['speedup']:.2f}x (authors' "
                  f"split), {modelled['best_split']['speedup']:.2f}x (best split); paper measured "
                  f"{PAPER.get(name, {}).get(k)}x", flush=True)
        results["models"][name] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
