"""Images/s of Features Replay against the alternatives a user of this machine would run.

    python bench/parallel_speed.py [--models resnet18,cifar_resnet56] [--repeats 2] [--out FILE]
                                   [--configs bp_1thread,ceiling,...] [--before REV]

For each model (batch 128, 32x32 synthetic images, 10 classes, SGD), every configuration runs in a
fresh process, each configuration `--repeats` times in alternation (these machines are noisy):
  bp_1thread   plain backprop, one process, one thread (the paper's one-device baseline)
  bp_2threads  plain backprop, one process, two threads
  fr_k2_rule   frzoo fr, K=2, two processes of one thread, the authors' split (ceil(n/K) blocks)
  fr_k2_auto   frzoo fr, K=2, two processes of one thread, split.auto=time
  bp_k2        frzoo bp, K=2, two processes (naive model parallelism), split.auto=time's cut
  ddp          DistributedDataParallel, two processes of one thread, 64 images each
  gpipe_M      torch.distributed.pipelining ScheduleGPipe, 2 stages, M micro-batches (M=2, 4, 8)
  1f1b_M       torch.distributed.pipelining Schedule1F1B, 2 stages, M micro-batches
  frzoo_gpipe_M, frzoo_1f1b_M, frzoo_zb1_M   frzoo's own synchronous schedules (algorithm.name=
               gpipe | 1f1b | zb1, algorithm.microbatches=M), K=2 at the same cut, as `frzoo run`
  ceiling      the machine's own ceiling c for two one-thread workers: one bp_1thread process
               alone, then two side by side, their images/s summed over the one alone (2.0 on
               ideal hardware; shared machines give less, and it swings from run to run). Both
               halves run back to back inside the one measurement, so c does not mix rounds; a
               configuration's ratio is read against the median c of the same run
  replicas_r2  frzoo with distributed.replicas=2 at K=1: two one-thread processes, 64 images each,
               gradients summed by frzoo's bucketed all-reduce (the sanity check against ddp)
  transport_now / transport_before   fr K=2 at the auto cut (given explicitly, so both use the
               same cut) with today's transport and with the code at --before (default: the last
               commit before the NCCL-ordered transport), run from a temporary git worktree
  CONFIG@bf16, @compile, @bf16_compile   the same with bf16 autocast, torch.compile (inductor) or
               both: for bp_1thread a plain loop, for fr_k2_auto frzoo's train.precision=bf16 /
               train.compile=true (compilation happens in the untimed warm-up steps)
Pipelining stages use the same cut as fr_k2_auto. Warm-up steps are not timed (frzoo rows: the
first LOG_EVERY steps, and they log every LOG_EVERY steps, as a real run logs every
train.log_every, so the pipeline keeps steps in flight between log points). The frzoo rows
also report each part's seconds per step in forward, replay, backward, optimizer and waiting.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

BATCH, SIZE, CLASSES = 128, 32, 10
WARMUP = 3
# frzoo rows log (and so end a run of steps: frzoo.executors.p2p) every LOG_EVERY steps; their
# warm-up is one such window and the timed steps whole windows. Logging every step would end a
# run of steps after each one and take away the overlap between steps.
LOG_EVERY = 5
STEPS = {"resnet18": 10, "cifar_resnet56": 6}
CONFIGS = ["bp_1thread", "ceiling", "bp_2threads", "fr_k2_rule", "fr_k2_auto", "bp_k2", "ddp",
           "gpipe_4", "gpipe_8", "1f1b_4", "1f1b_8", "replicas_r2", "transport_now",
           "transport_before"]
#: frzoo's synchronous schedules against torch's at the same M (issue 20):
#:   --configs bp_1thread,ceiling,fr_k2_auto,... (SYNC below)
SYNC = [f"{who}{name}_{m}" for m in (2, 4, 8) for name in ("gpipe", "1f1b")
        for who in ("", "frzoo_")] + [f"frzoo_zb1_{m}" for m in (2, 4, 8)]
#: the last commit whose distributed transport predates the NCCL-ordered one (issue 12)
BEFORE = "4dbd6d9"
VARIANTS = {"bf16": ["train.precision=bf16"], "compile": ["train.compile=true"],
            "bf16_compile": ["train.precision=bf16", "train.compile=true"]}


# ---------------------------------------------------------------- shared pieces
def build(model_name: str):
    import frzoo_registry  # noqa: F401  (the CIFAR ResNets)
    import timm
    import torch
    torch.manual_seed(0)
    return timm.create_model(model_name, num_classes=CLASSES)


def batch(n: int = BATCH):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def sgd(params):
    import torch
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def time_steps(step, steps: int) -> float:
    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


# ---------------------------------------------------------------- baselines
def plain(model_name: str, threads: int, steps: int, bf16: bool = False,
          compile: bool = False) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    model = build(model_name).train()
    opt = sgd(model.parameters())
    x, y = batch()
    forward = torch.compile(model) if compile else model  # compiled in the warm-up steps

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, steps)
    return {"images_per_s": steps * BATCH / seconds}


def _timed_report(step, steps: int, out: str, write: bool) -> None:
    """Both ranks start together, time `steps` steps; one rank writes images/s to `out`."""
    import torch.distributed as dist
    dist.barrier()
    seconds = time_steps(step, steps)
    if write:
        Path(out).write_text(json.dumps({"images_per_s": steps * BATCH / seconds}))
    dist.destroy_process_group()


def _ddp_worker(rank: int, model_name: str, steps: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    model = DistributedDataParallel(build(model_name).train())
    opt = sgd(model.parameters())
    x, y = batch()
    x, y = x[rank * BATCH // 2:(rank + 1) * BATCH // 2], y[rank * BATCH // 2:(rank + 1) * BATCH // 2]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _timed_report(step, steps, out, write=rank == 0)


def _pipe_worker(rank: int, model_name: str, steps: int, port: int, out: str, schedule: str,
                 microbatches: int, point: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from frzoo.split import resolve
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    model = build(model_name).train()
    parts = resolve(model, points=[point], build=True).parts
    x, y = batch()
    with torch.no_grad():
        example = x[: BATCH // microbatches] if rank == 0 else parts[0](x[: BATCH // microbatches])
    stage = PipelineStage(parts[rank], rank, 2, torch.device("cpu"), input_args=(example,))
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = cls(stage, microbatches, loss_fn=F.cross_entropy)
    opt = sgd(parts[rank].parameters())

    def step() -> None:
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _timed_report(step, steps, out, write=rank == 1)


def spawn2(target, *args) -> Dict[str, Any]:
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(target, args=(*args[:2], port, out, *args[2:]), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------- frzoo
def ceiling(model_name: str, steps: int) -> Dict[str, Any]:
    """One bp_1thread process alone, then two at once: c = their summed images/s over the one."""
    def launch(n: int) -> List[float]:
        procs = [subprocess.Popen([sys.executable, __file__, "--one", model_name, "bp_1thread", "-"],
                                  stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"]
                for p in procs]
    alone = launch(1)[0]
    pair = launch(2)
    return {"images_per_s": sum(pair), "each": pair, "alone": alone, "c": sum(pair) / alone}


#: metric names of the code before the metrics schema (the `transport_before` rows run it)
OLD_NAMES = {"images_per_s": "train/images_per_s"}


def _new_name(key: str) -> str:
    """`part1_wait_s` (old) -> `part1/wait_s`; names already in today's schema unchanged."""
    if key in OLD_NAMES:
        return OLD_NAMES[key]
    if key.startswith("part") and "_" in key and "/" not in key:
        head, _, rest = key.partition("_")
        return f"{head}/{rest}"
    return key


def frzoo_run(model_name: str, algorithm: str, split: List[str], steps: int,
              code: str = "") -> Dict[str, Any]:
    """One frzoo run (today's code, or the checkout at `code` on PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=code) if code else None
    with tempfile.TemporaryDirectory() as tmp:
        steps = -(-steps // LOG_EVERY) * LOG_EVERY  # whole windows
        total = LOG_EVERY + steps  # the first window is the warm-up
        cmd = [sys.executable, "-m", "frzoo.cli", "run", f"model.name={model_name}",
               "data.name=synthetic", f"data.num_train={total * BATCH}", f"data.num_test={BATCH}",
               f"data.batch_size={BATCH}", f"data.image_size={SIZE}", "data.augment=none",
               f"data.num_classes={CLASSES}", "executor=distributed", "train.threads=1",
               f"algorithm.name={algorithm}", f"train.max_steps={total}", "train.eval_every=0",
               f"train.log_every={LOG_EVERY}", "train.progress=false", "optimizer.nesterov=true",
               f"run.out_dir={tmp}/run", *split]
        if os.environ.get("FRZOO_BENCH_MEMORY"):  # --memory: each part's peak activations
            cmd.append("train.measure_memory=true")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code or None)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        records = [{_new_name(k): v for k, v in json.loads(line).items()}
                   for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        points = json.loads(Path(tmp, "run", "partition.json").read_text())
    train = [r for r in records if r["kind"] == "train"]
    timed = [r for r in train if r["step"] > LOG_EVERY]
    # each record covers the steps since the one before (its images/s is their mean)
    covered = [r["step"] - p["step"] for p, r in zip(train, train[1:]) if r["step"] > LOG_EVERY]
    seconds = sum(n * BATCH / r["train/images_per_s"] for n, r in zip(covered, timed))
    parts = {}
    for key in timed[0]:
        if key.startswith("part") and key.endswith("_s"):  # partK/forward_s ...
            parts[key] = statistics.median(r[key] for r in timed)
    # each part's peak of the bytes it keeps alive for its backward (frzoo.memory), in the run
    memory = {k.split("/")[0]: max(r[k] for r in timed) for k in timed[0]
              if k.endswith("/peak_activation_bytes")}
    # each part's share of its step spent waiting for the other (the busiest part waits least)
    waits = {k.split("/")[0]: parts[k] / parts[k.replace("wait_s", "step_s")]
             for k in parts if k.endswith("/wait_s") and parts.get(k.replace("wait_s", "step_s"))}
    return {"images_per_s": sum(covered) * BATCH / seconds, "part_seconds": parts,
            "wait_share": waits, "peak_activation_bytes": memory, "cut": points[1]["modules"][0] if len(points) > 1 else None}


def auto_point(model_name: str) -> str:
    """The cut split.auto=time picks for fr at K=2 (measured at one thread, as the workers run)."""
    import torch
    from frzoo.plugins import ALGORITHMS
    from frzoo.split import balanced_points
    torch.set_num_threads(1)
    points, _ = balanced_points(build(model_name), 2, by="time", algorithm=ALGORITHMS.get("fr"),
                                sample=batch()[0])
    return points[0]


def rule_point(model_name: str) -> str:
    from frzoo.split import points_for_k
    return points_for_k(build(model_name), 2)[0]


def run_one(model_name: str, config: str, steps: int, point: str) -> Dict[str, Any]:
    base, _, variant = config.partition("@")
    if config == "ceiling":
        return ceiling(model_name, steps)
    if base == "bp_1thread":
        return plain(model_name, 1, steps, bf16="bf16" in variant, compile="compile" in variant)
    if base == "fr_k2_auto" and variant:
        return frzoo_run(model_name, "fr", ["split.auto=time", "split.k=2", *VARIANTS[variant]],
                         steps)
    if config == "bp_2threads":
        return plain(model_name, 2, steps)
    if config == "fr_k2_rule":
        return frzoo_run(model_name, "fr", ["split.k=2"], steps)
    if config == "fr_k2_auto":
        return frzoo_run(model_name, "fr", ["split.auto=time", "split.k=2"], steps)
    if config == "replicas_r2":
        return frzoo_run(model_name, "bp", ["split.k=1", "distributed.replicas=2"], steps)
    if config == "transport_now":
        return frzoo_run(model_name, "fr", [f"split.points=[{point}]"], steps)
    if config == "transport_before":
        return frzoo_run(model_name, "fr", [f"split.points=[{point}]"], steps,
                         code=os.environ["FRZOO_BENCH_BEFORE"])
    if config == "bp_k2":
        return frzoo_run(model_name, "bp", [f"split.points=[{point}]"], steps)
    if config == "ddp":
        return spawn2(_ddp_worker, model_name, steps)
    if config.startswith("frzoo_"):  # frzoo's gpipe / 1f1b / zb1 at the same cut
        _, name, mb = config.split("_")
        return frzoo_run(model_name, name, [f"split.points=[{point}]",
                                            f"algorithm.microbatches={mb}"], steps)
    schedule, mb = config.split("_")
    return spawn2(_pipe_worker, model_name, steps, schedule, int(mb), point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,cifar_resnet56")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/parallel_speed.json")
    parser.add_argument("--memory", action="store_true",
                        help="frzoo rows also record each part's peak activation bytes "
                             "(train.measure_memory=true; it costs time: a separate run)")
    parser.add_argument("--before", default=BEFORE,
                        help="git revision whose transport the transport_before rows run")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "CONFIG", "POINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        os.environ["FRZOO_BENCH_MEMORY"] = "1"
    if args.one:
        model_name, config, point = args.one
        print(json.dumps(run_one(model_name, config, STEPS.get(model_name, 6), point)))
        return
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "batch": BATCH, "image_size": SIZE, "warmup_steps": WARMUP, "models": {}}
    import torch
    results["machine"]["torch"] = torch.__version__
    with contextlib.ExitStack() as stack:
        if "transport_before" in args.configs.split(","):
            os.environ["FRZOO_BENCH_BEFORE"] = stack.enter_context(checkout(args.before))
            results["before"] = args.before
        measure(args, results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[str]:
    """A temporary detached git worktree of this repository at `rev`."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", path, rev],
                       check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", path],
                           capture_output=True)


def measure(args: argparse.Namespace, results: Dict[str, Any]) -> None:
    """Every configuration `args.repeats` times, in alternation, each in a fresh process."""
    for model_name in args.models.split(","):
        point = auto_point(model_name)
        rows: Dict[str, List[Dict[str, Any]]] = {c: [] for c in args.configs.split(",")}
        for repeat in range(args.repeats):
            for config in rows:
                proc = subprocess.run([sys.executable, __file__, "--one", model_name, config, point],
                                      capture_output=True, text=True)
                if proc.returncode:
                    rows[config].append({"error": proc.stderr[-1500:]})
                    print(f"{model_name} {config}: FAILED\n{proc.stderr[-1500:]}", file=sys.stderr)
                    continue
                rows[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{model_name} {config} #{repeat + 1}: {rows[config][-1]['images_per_s']:.1f} img/s",
                      file=sys.stderr, flush=True)
        results["models"][model_name] = {"auto_point": point, "rule_point": rule_point(model_name),
                                         "runs": rows}


def table(results: Dict[str, Any]) -> str:
    """Per model: each configuration's median images/s, its ratio to bp_1thread (the median of
    the per-round ratios: rounds alternate, so a round's configurations share the machine's
    state) and that ratio over the run's median ceiling c."""
    lines = []
    for model_name, entry in results["models"].items():
        runs = entry["runs"]
        base = [r.get("images_per_s") for r in runs["bp_1thread"]]
        cs = [r["c"] for r in runs.get("ceiling", []) if "c" in r]
        c = statistics.median(cs) if cs else None
        lines += [f"\n### {model_name} (auto cut: {entry['auto_point']}, rule cut: "
                  f"{entry['rule_point']})\n",
                  "ceiling c: " + (f"{c:.2f} (rounds: {', '.join(f'{v:.2f}' for v in cs)})"
                                   if c else "not measured") + "\n",
                  "| configuration | img/s (median) | runs | x bp_1thread | x c | period | wait share "
                  "| peak activations per part |",
                  "|---|---|---|---|---|---|---|---|"]
        for config, rows in runs.items():
            values = [r["images_per_s"] for r in rows if "images_per_s" in r]
            if not values:
                lines.append(f"| {config} | failed | | | |")
                continue
            ratios = [r["images_per_s"] / b for r, b in zip(rows, base)
                      if "images_per_s" in r and b]
            ratio = statistics.median(ratios) if ratios else float("nan")
            over_c = f"{ratio / c:.2f}" if c else ""
            period = BATCH / statistics.median(values)
            waits = [r["wait_share"] for r in rows if r.get("wait_share")]
            wait = ", ".join(f"{part} {100 * statistics.median(w[part] for w in waits):.0f}%"
                             for part in sorted(waits[0])) if waits else ""
            peaks = [r["peak_activation_bytes"] for r in rows if r.get("peak_activation_bytes")]
            memory = ", ".join(f"{part} {max(p[part] for p in peaks) / 2 ** 20:.0f} MB"
                               for part in sorted(peaks[0])) if peaks else "not measured"
            lines.append(f"| {config} | {statistics.median(values):.1f} | "
                         f"{', '.join(f'{v:.1f}' for v in values)} | {ratio:.2f}x | {over_c} | "
                         f"{1000 * period:.0f} ms | {wait} | {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
