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

    python bench/speedup_model.py --scale-out [--devices 4,8,16] [--intra-gbs 150]
        [--inter-gbs 25] [--gpus-per-node 8] [--sustained-tflops 0,100] [--out FILE]

R replicas of the K-part pipeline (Features Replay x data parallel) against pure DDP on the same
N = R x K devices, at the same global batch: see :func:`scale_out` for the cost model.
"""
from __future__ import annotations

import argparse
import json
import platform
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


# ---------------------------------------------------------------- R x K against DDP
SCALE_MODELS = "cifar_resnet101,cifar_resnet164,resnet50,vit_base_patch16_224"
GLOBAL_BATCH = {"cifar": 128, "imagenet": 256}  # the paper's CIFAR batch; a common ImageNet one
DDP_BUCKET_BYTES = 25 * 2 ** 20  # DistributedDataParallel's bucket_cap_mb default


def measure_model(name: str, batch: int, device: torch.device) -> Dict[str, object]:
    """Per sample: each unit's (forward, backward + update) seconds and forward FLOPs, the bytes
    of the activation entering it, and each unit's gradient bytes (fp32, what an all-reduce
    moves). Units are run as a chain of modules (for a ViT that skips the position embedding and
    the token pooling: under 1% of its FLOPs)."""
    import timm
    from frzoo.split.balance import units_of
    from frzoo.split.costs import measure_units, unit_flops
    torch.manual_seed(0)
    cifar = name.startswith("cifar_")
    model = timm.create_model(name, num_classes=10 if cifar else 1000).to(device)
    size = 32 if cifar else model.pretrained_cfg["input_size"][-1]
    units = units_of(model)
    sample = torch.randn(batch, 3, size, size, device=device)
    costs = measure_units(model, units, sample, repeats=3)
    return {"input": size, "global_batch": GLOBAL_BATCH["cifar" if cifar else "imagenet"],
            "units": len(units), "measured_batch": batch,
            "costs": [(f / batch, b / batch) for f, b in costs],
            "flops": unit_flops(model, units, sample[:1]),
            "act_bytes": [a / batch for a in activation_bytes(model, units, sample)],
            "param_bytes": [4 * sum(p.numel() for n in unit
                                    for p in model.get_submodule(n).parameters())
                            for unit in units]}


def ring_seconds(nbytes: float, members: int, bandwidth: float) -> float:
    """A ring all-reduce: each member sends and receives 2 (n-1)/n of the bytes."""
    return 0.0 if members < 2 else 2 * (members - 1) / members * nbytes / bandwidth


def reduced_backward(backward: float, nbytes: float, members: int, bandwidth: float,
                     overlap: bool) -> float:
    """Backward plus gradient all-reduce. Overlapped as DDP does: buckets are reduced while the
    backward goes on, and only the last bucket (the first layers, ready last) waits after it."""
    total = ring_seconds(nbytes, members, bandwidth)
    if not overlap:
        return backward + total
    tail = ring_seconds(min(DDP_BUCKET_BYTES, nbytes), members, bandwidth)
    return max(backward, total - tail) + tail


def ddp_step(m: Dict[str, object], n: int, bw: Tuple[float, float], per_node: int) -> float:
    """Seconds per step of DDP on n devices: each runs F + B on global/n samples, then the whole
    model's gradients are all-reduced over n members (the slowest link: across nodes when n
    exceeds a node), overlapped with the backward per bucket."""
    g = m["global_batch"] / n
    forward = sum(f for f, _ in m["costs"]) * g
    backward = sum(b for _, b in m["costs"]) * g
    bandwidth = bw[0] if n <= per_node else bw[1]
    return forward + reduced_backward(backward, sum(m["param_bytes"]), n, bandwidth, True)


def frxdp_step(m: Dict[str, object], r: int, k: int, bw: Tuple[float, float], per_node: int,
               overlap: bool) -> Tuple[float, List[int]]:
    """Seconds per step of R x K: each replica's pipeline takes global/R samples; part k costs
    2F + B (the last F + B, no bubble), sends its activation and delta over the node's links
    (a replica's parts share a node), and all-reduces its own gradients with the R copies of
    part k (within a node while R replicas fit in one, else across nodes); the period is the
    busiest part's. The split is the best one for Features Replay's cost (split.auto=time)."""
    from frzoo.algorithms.fr import FeaturesReplay
    from frzoo.split.balance import best_cuts, part_cost
    costs, g = m["costs"], m["global_batch"] / r
    cuts = best_cuts(len(costs), k, lambda a, b, i: part_cost(costs[a:b], i, k, FeaturesReplay))
    bounds = [0, *cuts, len(costs)]
    bandwidth = bw[0] if r <= max(1, per_node // k) else bw[1]
    period = 0.0
    for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
        forward = sum(f for f, _ in costs[a:b]) * g
        backward = sum(x for _, x in costs[a:b]) * g
        transfer = 2 * (m["act_bytes"][a] if a > 0 else 0.0) * g / bw[0] \
            + 2 * (m["act_bytes"][b] if b < len(costs) else 0.0) * g / bw[0]
        plays = part_cost(costs[a:b], index, k, FeaturesReplay) * g - backward  # F or 2F
        period = max(period, plays + transfer + reduced_backward(
            backward, sum(m["param_bytes"][a:b]), r, bandwidth, overlap))
    return period, cuts


def gpu_scaled(m: Dict[str, object], tflops: float) -> Dict[str, object]:
    """The measured per-unit times rescaled so the whole model runs at `tflops` sustained (3x
    the forward FLOPs per sample for forward + backward); 0 keeps the measured times. The unit
    ratios stay the measured device's."""
    if not tflops:
        return m
    measured = sum(f + b for f, b in m["costs"])
    scale = 3 * sum(m["flops"]) / (tflops * 1e12) / measured
    return {**m, "costs": [(f * scale, b * scale) for f, b in m["costs"]]}


def scale_out(models: Dict[str, Dict[str, object]], devices: List[int], tflops: List[float],
              bw: Tuple[float, float], per_node: int) -> Dict[str, object]:
    """Throughput (images/s) of DDP and of every R x K (K = 2, 4, 8 dividing N, fitting a node)
    on N devices, per compute scale, and which wins by how much."""
    out: Dict[str, object] = {}
    for tf in tflops:
        label = f"{tf:g}_tflops" if tf else "as_measured"
        rows = out.setdefault(label, {})
        for name, measured in models.items():
            m = gpu_scaled(measured, tf)
            one = sum(f + b for f, b in m["costs"])  # seconds per sample on one device
            for n in devices:
                ddp = m["global_batch"] / ddp_step(m, n, bw, per_node)
                row = {"ddp_img_s": ddp, "ddp_speedup": ddp * one, "rxk": {}}
                for k in (2, 4, 8):
                    if n % k or k > min(per_node, m["units"]):
                        continue
                    r = n // k
                    for overlap in (True, False):
                        period, cuts = frxdp_step(m, r, k, bw, per_node, overlap)
                        key = f"R{r}xK{k}" + ("" if overlap else "_no_overlap")
                        row["rxk"][key] = {"img_s": m["global_batch"] / period,
                                           "vs_ddp": m["global_batch"] / period / ddp,
                                           "cuts": cuts}
                best = max((v["vs_ddp"], key) for key, v in row["rxk"].items()
                           if not key.endswith("no_overlap"))
                row["best_rxk"], row["best_vs_ddp"] = best[1], best[0]
                rows.setdefault(name, {})[n] = row
                print(f"[{label}] {name} N={n}: DDP {ddp:.0f} img/s; best {best[1]} "
                      f"{best[0]:.2f}x DDP", flush=True)
    return out


def main_scale_out(args: argparse.Namespace) -> None:
    import frzoo_registry  # noqa: F401  (the CIFAR ResNets)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    models = {}
    for name in args.models.split(","):
        batch = args.batch if name.startswith("cifar_") else args.batch_224
        models[name] = measure_model(name, batch, device)
        print(f"measured {name}: {models[name]['units']} units, "
              f"{sum(models[name]['param_bytes']) / 1e6:.1f} MB of fp32 gradients, "
              f"{3 * sum(models[name]['flops']) / 1e9:.2f} GFLOP per sample (F+B)", flush=True)
    bw = (args.intra_gbs * 1e9, args.inter_gbs * 1e9)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
               "machine": f"{torch.get_num_threads()} thread(s) of {platform.processor() or platform.machine()}",
               "assumptions": {"intra_node_gbs": args.intra_gbs, "inter_node_gbs": args.inter_gbs,
                               "gpus_per_node": args.gpus_per_node, "grad_bytes_per_param": 4,
                               "ddp_bucket_bytes": DDP_BUCKET_BYTES, "all_reduce": "ring",
                               "compute": "linear in the batch", "transfers": "not overlapped"},
               "models": {name: {k: v for k, v in m.items() if k != "costs"} | {
                   "seconds_per_sample": sum(f + b for f, b in m["costs"]),
                   "backward_over_forward": sum(b for _, b in m["costs"]) / sum(f for f, _ in m["costs"])}
                   for name, m in models.items()},
               "per_sample_costs": {name: m["costs"] for name, m in models.items()},
               "scale_out": scale_out(models, [int(n) for n in args.devices.split(",")],
                                      [float(t) for t in args.sustained_tflops.split(",")], bw,
                                      args.gpus_per_node)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scale-out", action="store_true",
                        help="model R replicas x K parts against DDP on N devices instead")
    parser.add_argument("--batch-224", type=int, default=4,
                        help="--scale-out: measured batch of the 224x224 models")
    parser.add_argument("--devices", default="4,8,16", help="--scale-out: N, the devices")
    parser.add_argument("--intra-gbs", type=float, default=150.0,
                        help="--scale-out: GB/s between two devices of a node (NVLink-class)")
    parser.add_argument("--inter-gbs", type=float, default=25.0,
                        help="--scale-out: GB/s per device between nodes (200 Gb/s class)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--sustained-tflops", default="0,100",
                        help="--scale-out: compute rescaled to this many TFLOP/s (0: as measured)")
    parser.add_argument("--bandwidth-gbs", type=float, default=10.0)
    parser.add_argument("--models", default="cifar_resnet164,cifar_resnet101")
    parser.add_argument("--device", default="cpu",
                        help="where the per-block times are measured (cpu: one thread; cuda)")
    parser.add_argument("--out", default=None, help="default bench/results/speedup_model.json, "
                        "with --scale-out bench/results/speedup_model_rxk.json")
    args = parser.parse_args()
    if args.scale_out:
        if args.models == parser.get_default("models"):
            args.models = SCALE_MODELS
        args.out = args.out or "bench/results/speedup_model_rxk.json"
        main_scale_out(args)
        return
    args.out = args.out or "bench/results/speedup_model.json"
    import frzoo_registry  # noqa: F401
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
