"""A MODEL (not a measurement) of Features Replay's speedup on K devices for the paper's ResNets.

    python bench/speedup_model.py [--batch 32] [--bandwidth-gbs 10] [--device cpu|cuda] [--out FILE]
        [--schedule-ks 2,3,4,5,6,7,8] [--microbatches-per-part 1,4]

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

The same measured times also model, at K = 2..8 (--schedule-ks) and M = K and 4K micro-batches
(--microbatches-per-part), the synchronous pipelines beside fr and ddg: gpipe, 1f1b and zb1
(ZB-H1), each on the best split for its own cost, with the activation memory each part holds.
Each unit's backward is split into its input gradient and its weight gradient by a second
measurement (see :func:`input_gradient_share`); the formulas are the small functions below
(:func:`gpipe_seconds`, :func:`zb1_seconds`, :func:`activations_held`). A markdown table of
all of them is printed at the end.

    python bench/speedup_model.py --scale-out [--devices 4,8,16] [--intra-gbs 150]
        [--inter-gbs 25] [--gpus-per-node 8] [--sustained-tflops 0,100] [--out FILE]

R replicas of the K-part pipeline (Features Replay x data parallel) against pure DDP on the same
N = R x K devices, at the same global batch: see :func:`scale_out` for the cost model.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
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


# ---------------------------------------------------------------- synchronous pipelines
PIPELINES = ("gpipe", "1f1b", "zb1")
SCHEDULES = ("bp", "fr", "ddg", *PIPELINES)


def bubble_fraction(k: int, m: int) -> float:
    """Share of a gpipe or 1f1b iteration every part idles, K equal parts, M micro-batches:
    (K - 1) / (M + K - 1), the K - 1 slots of :func:`gpipe_seconds` (Huang et al., "GPipe",
    NeurIPS 2019, section 2.3)."""
    return (k - 1) / (m + k - 1)


def gpipe_seconds(step: float, k: int, m: int) -> float:
    """One gpipe iteration: (M + K - 1) * step, `step` the slowest part's forward + backward
    (input and weight gradient) seconds on one micro-batch. Every part is taken as slow as the
    slowest (the uniform-stage model, pessimistic by at most the fill of the faster parts): M
    slots of work, and K - 1 slots of fill (the first micro-batch's forward reaching the last
    part) and drain (the last backward coming back). Also 1f1b's time: its order of the same
    work changes the memory, not the bubble (Narayanan et al., "Memory-Efficient Pipeline-
    Parallel DNN Training", ICML 2021; Qi et al. 2024, Table 2: 1F1B's bubble (K-1)(F+B+W))."""
    return (m + k - 1) * step


def zb1_seconds(forward: float, input_grad: float, weight_grad: float, k: int, m: int) -> float:
    """One ZB-H1 iteration (Qi, Wan, Huang, Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024,
    arXiv 2401.10241, section 2.1 and Table 2): with the backward split into the input gradient
    B, which the part before waits for, and the weight gradient W, which it does not, W is
    deferred into the bubble and the bubble shrinks from 1F1B's (K - 1)(F + B + W) to
    (K - 1)(F + B - W), at 1F1B's peak memory. Here M (F + B + W) + (K - 1) max(0, F + B - W),
    with the slowest part's F, B, W on one micro-batch (the uniform-stage model of
    :func:`gpipe_seconds`); the max because a bubble cannot be negative (ZB-H2's smaller one,
    (K - 1)(F + B - 2W), needs 2K - 1 micro-batches of memory and is not modelled)."""
    return m * (forward + input_grad + weight_grad) + (k - 1) * max(
        0.0, forward + input_grad - weight_grad)


def activations_held(schedule: str, index: int, k: int, m: int) -> float:
    """The most forward graphs (what autograd saves for a backward) part `index` (0-based) of K
    holds at once, in batches of that part's own activations (one micro-batch is 1/M of one):
    bp and fr 1 (fr: the replay's graph; the play keeps none); ddg K - index, one per iteration
    in flight (frzoo.algorithms.ddg); gpipe M micro-batches, 1 batch (every forward runs before
    the first backward: GPipe, section 2.3); 1f1b and zb1 min(K - index, M) micro-batches, the
    warm-up's forwards in flight (Narayanan et al. 2021; ZB-H1 keeps 1F1B's peak, Qi et al.
    2024, Table 2: pM_B)."""
    if schedule in ("bp", "fr", "gpipe"):
        return 1.0
    if schedule == "ddg":
        return float(k - index)
    if schedule in ("1f1b", "zb1"):
        return min(k - index, m) / m
    raise ValueError(f"schedule={schedule!r}: not one of {', '.join(SCHEDULES)}.")


def inputs_held(schedule: str, index: int, k: int) -> int:
    """Stale inputs part `index` keeps besides its graphs: K - 1 - index for fr and ddg (their
    history, frzoo.algorithms.base.DelayedPart.staleness_of), none for the others (a
    synchronous pipeline's input is part of the graph it saves)."""
    return k - 1 - index if schedule in ("fr", "ddg") else 0


def part_seconds(schedule: str, index: int, k: int, forward: float, backward: float) -> float:
    """Work of one part per iteration under fr, ddg or a pipeline's balance: 2F + B for an fr
    part but the last (play, replay, backward), F + B otherwise (docs/algorithm.md, "Ideal
    speed"): what the best split for `schedule` balances."""
    if schedule == "fr" and index < k - 1:
        return 2 * forward + backward
    return forward + backward


def schedule_seconds(schedule: str, parts: List[Tuple[float, float, float]], k: int,
                     m: int) -> float:
    """Seconds of one iteration (one batch) of `schedule` on K devices, from each part's
    (forward, input gradient, weight gradient) seconds on the whole batch, transfers included.
    fr and ddg: the busiest part's work (they have no bubble: every part works on a different
    iteration); a pipeline: M micro-batches of 1/M of that work each (compute linear in the
    batch), see :func:`gpipe_seconds` and :func:`zb1_seconds`."""
    if schedule in ("fr", "ddg"):
        return max(part_seconds(schedule, i, k, f, b + w) for i, (f, b, w) in enumerate(parts))
    slowest = max(parts, key=lambda p: sum(p))
    f, b, w = (t / m for t in slowest)
    if schedule == "zb1":
        return zb1_seconds(f, b, w, k, m)
    return gpipe_seconds(f + b + w, k, m)


def unit_tables(costs: List[Tuple[float, float]], shares: List[float], sizes: List[int],
                bandwidth: float, bounds: List[int]) -> List[Tuple[float, float, float]]:
    """Each part's (forward, input gradient, weight gradient) seconds per batch between
    `bounds`: the units' measured backward (with the update) split by their measured
    input-gradient shares; the transfers (an activation and a delta each way across each of
    its cuts, not overlapped) on the critical path, half with the forward, half with the input
    gradient."""
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        transfer = (2 * sizes[a] if a > 0 else 0) + (2 * sizes[b] if b < len(costs) else 0)
        transfer /= bandwidth
        grad_in = sum(bw * s for (_, bw), s in zip(costs[a:b], shares[a:b]))
        grad_w = sum(bw for _, bw in costs[a:b]) - grad_in
        parts.append((sum(f for f, _ in costs[a:b]) + transfer / 2, grad_in + transfer / 2,
                      grad_w))
    return parts


def compare_schedules(costs: List[Tuple[float, float]], shares: List[float], sizes: List[int],
                      memory: List[Tuple[float, float, float]], bandwidth: float, k: int,
                      m: int) -> Dict[str, Dict[str, object]]:
    """Every schedule at K parts and M micro-batches on its own best split: speedup over bp on
    one device, and per part the graphs held (batches of its activations, see
    :func:`activations_held`) and the activation bytes (graphs x saved bytes + stale inputs x
    input bytes; parameters and optimizer state are left out: the same for all)."""
    from frzoo.split.balance import best_cuts
    one_device = sum(f + b for f, b in costs)
    out: Dict[str, Dict[str, object]] = {}
    for schedule in SCHEDULES:
        if schedule == "bp":
            cuts: List[int] = []
        else:
            cuts = best_cuts(len(costs), k, lambda a, b, i, s=schedule: part_seconds(
                s, i, k, sum(f for f, _ in costs[a:b]), sum(x for _, x in costs[a:b])))
        bounds = [0, *cuts, len(costs)]
        parts = unit_tables(costs, shares, sizes, bandwidth, bounds)
        n = len(parts)
        seconds = one_device if schedule == "bp" else schedule_seconds(schedule, parts, k, m)
        held = [activations_held(schedule, i, n, m) for i in range(n)]
        act = [held[i] * sum(r[0] for r in memory[a:b]) + inputs_held(schedule, i, n) * memory[a][1]
               for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        out[schedule] = {"speedup": one_device / seconds, "cuts": cuts, "graphs_held": held,
                         "activation_bytes": act, "peak_activation_bytes": max(act)}
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
    parser.add_argument("--schedule-ks", default="2,3,4,5,6,7,8",
                        help="K of the table of every schedule (fr, ddg, gpipe, 1f1b, zb1)")
    parser.add_argument("--microbatches-per-part", default="1,4",
                        help="the pipelines' micro-batches M, as multiples of K (1,4: M=K, 4K)")
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
    torch.set_num_threads(1)
    device = torch.device(args.device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch,
               "bandwidth_gbs": args.bandwidth_gbs, "device": str(device),
               "machine": f"{torch.get_num_threads()} thread(s) of "
                          f"{platform.processor() or platform.machine()}", "models": {}}
    for name in args.models.split(","):
        results["models"][name] = model_entry(name, args, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown_tables(results), flush=True)


def model_entry(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """One model: its per-unit times measured, fr's speedup at K = 2, 3, 4 with the authors' and
    the best split (against the paper's), and every schedule at --schedule-ks and M."""
    import timm
    from frzoo.algorithms.fr import FeaturesReplay
    from frzoo.split import points_for_k
    from frzoo.split.balance import best_cuts, part_cost, units_of
    from frzoo.split.costs import measure_units, unit_memory
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(device)
    units = units_of(model)
    sample = torch.randn(args.batch, 3, 32, 32, device=device)
    costs = measure_units(model, units, sample, repeats=3)
    shares = input_gradient_share(model, units, sample, repeats=3)
    memory = unit_memory(model, units, sample)
    sizes = activation_bytes(model, units, sample)
    bandwidth = args.bandwidth_gbs * 1e9
    first = [u[0] for u in units]
    backward = sum(b for _, b in costs)
    entry: Dict[str, object] = {
        "units": len(units), "backward_over_forward": backward / sum(f for f, _ in costs),
        "input_gradient_share": sum(b * s for (_, b), s in zip(costs, shares)) / backward,
        "k": {}, "schedules": {}}
    for k in (2, 3, 4):
        rule = [first.index(p) if p in first else next(i for i, u in enumerate(units) if p in u)
                for p in points_for_k(model, k)]
        best = best_cuts(len(units), k, lambda a, b, i: part_cost(costs[a:b], i, k, FeaturesReplay))
        modelled = model_speedups(costs, sizes, bandwidth, {"authors_split": rule, "best_split": best})
        entry["k"][k] = {**modelled, "paper_measured": PAPER.get(name, {}).get(k),
                         "ideal_equal_parts": 3 * k / 4, "ideal_best": (3 * k + 1) / 4}
        print(f"{name} K={k}: modelled {modelled['authors_split']['speedup']:.2f}x (authors' "
              f"split), {modelled['best_split']['speedup']:.2f}x (best split); paper measured "
              f"{PAPER.get(name, {}).get(k)}x", flush=True)
    for k in (int(x) for x in args.schedule_ks.split(",")):
        for factor in (int(x) for x in args.microbatches_per_part.split(",")):
            m = factor * k
            entry["schedules"][f"K={k},M={m}"] = {
                "k": k, "m": m, "bubble_fraction": bubble_fraction(k, m),
                **compare_schedules(costs, shares, sizes, memory, bandwidth, k, m)}
    return entry


def input_gradient_share(model: torch.nn.Module, units: List[List[str]], sample: torch.Tensor,
                         repeats: int = 3) -> List[float]:
    """Per unit, the share of its backward that computes its input's gradient (zero bubble's B)
    rather than its weights' (W): the median seconds of a backward asked for the input gradient
    only over those of one asked for both, on the unit's input from the units before it (train
    mode, one warm-up round first). The first unit's input gets a gradient too, though a first
    part needs none: a few percent of one unit counted as B rather than W."""
    sync = (lambda: torch.cuda.synchronize(sample.device)) if sample.device.type == "cuda" \
        else (lambda: None)
    stages = [torch.nn.Sequential(*[model.get_submodule(n) for n in unit]) for unit in units]
    times: List[Tuple[List[float], List[float]]] = [([], []) for _ in stages]
    model.train()
    for round_ in range(repeats + 1):
        h = sample
        for n, stage in enumerate(stages):
            x = h.detach().requires_grad_(True)
            y = stage(x.clone())  # a non-leaf, so an in-place first operation is allowed
            grad = torch.ones_like(y)
            sync()
            start = time.perf_counter()
            torch.autograd.grad(y, [x], grad, retain_graph=True)
            sync()
            mid = time.perf_counter()
            torch.autograd.grad(y, [x, *stage.parameters()], grad)
            sync()
            if round_:
                times[n][0].append(mid - start)
                times[n][1].append(time.perf_counter() - mid)
            h = y.detach()
    return [min(1.0, statistics.median(a) / statistics.median(b)) for a, b in times]


def markdown_tables(results: Dict[str, object]) -> str:
    """The docs' tables: per model and K, each schedule's speedup over bp on one device and its
    peak part's activation memory (MB at the measured batch)."""
    lines = []
    for name, entry in results["models"].items():
        rows = list(entry["schedules"].values())
        ms = sorted({r["m"] // r["k"] for r in rows})
        head = ["K", "fr", "ddg", *[f"{s} M={f if f > 1 else ''}K" for f in ms for s in PIPELINES]]
        lines += [f"{name} (batch {results['batch']}; speedup over bp on one device / "
                  "peak part's activations, MB)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in sorted({r["k"] for r in rows}):
            at = {r["m"] // k: r for r in rows if r["k"] == k}
            cells = [str(k)] + [cell(at[ms[0]][s]) for s in ("fr", "ddg")] + [
                cell(at[f][s]) for f in ms for s in PIPELINES]
            lines.append("| " + " | ".join(cells) + " |")
        bp = rows[0]["bp"]
        lines += ["", f"bp on one device: {bp['peak_activation_bytes'] / 2 ** 20:.0f} MB of "
                  "activations.", ""]
    return "\n".join(lines)


def cell(row: Dict[str, object]) -> str:
    """One schedule's speedup and peak part's activation memory, as the table shows them."""
    return f"{row['speedup']:.2f}x / {row['peak_activation_bytes'] / 2 ** 20:.0f}"


if __name__ == "__main__":
    main()
