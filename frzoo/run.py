"""From a recipe to a run: the one place where a training job is put together.

`frzoo run`, `frzoo eval`, every process of a distributed job (spawned by frzoo or started by
torchrun) and the benchmarks assemble a run through these functions, in this order:

    choose_executor `executor: auto` resolved: one process, or one process per part
    resolve_split   split.auto measured once (a resumed run keeps the points it chose)
    build           plugins -> data -> model cut into parts -> the executor that runs them
    train           the run folder and its lock, then the training loop (frzoo.trainer), here
                    or in one process per part (frzoo.executors.launch)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from . import rundir
from .data import DataModule, build_data
from .errors import FrzooError
from .executors.base import Executor
from .executors.launch import choose_backend, launch, under_torchrun
from .executors.local import LocalExecutor
from .executors.p2p import DistributedExecutor
from .executors.replicas import Layout, Replica, part_groups
from .logging import Logger, build_loggers, close_loggers
from .pipeline import (Pipeline, build_pipeline, load_plugins, num_parts_requested,
                       replica_devices, resolve_algorithm, resolve_auto_split, resolve_devices)
from .sigma import SigmaProbe
from .trainer import run_loop

Echo = Callable[[str], None]


@dataclass
class Assembly:
    """What one process runs: the data, its parts (all of them, or the one of its rank) and the
    executor that moves activations and deltas between them."""
    data: DataModule
    pipeline: Pipeline
    executor: Executor
    probe: Optional[SigmaProbe] = None  # train.sigma_every: a hook of the training loop


def choose_executor(cfg: DictConfig) -> Tuple[str, str]:
    """`local` or `distributed`, and why: the one place `executor: auto` is resolved.

    auto runs one process per part when the parts sit on two or more distinct devices (each
    device then works on its own part at the same time), and every part in one process when
    they share one (all on cpu, all on cuda:0, or devices unset): processes on one device would
    only take turns, and pay for the transfers. Under torchrun each process is one part.
    """
    k = num_parts_requested(cfg) or 1
    parts = f"{k} part{'s' if k != 1 else ''}"
    replicas = cfg.distributed.replicas
    if replicas > 1:
        parts = f"{replicas} replicas x {parts} = {replicas * k} processes"
    if under_torchrun():
        return "distributed", f"started by torchrun: one process per part ({parts})"
    if replicas > 1:  # config.validate refuses executor=local with replicas
        return "distributed", f"distributed.replicas={replicas}: {parts}"
    if cfg.executor != "auto":
        return cfg.executor, f"as the recipe sets ({parts})"
    devices: List[str] = []
    for name in cfg.devices or ["cpu"]:
        if _device_name(name) not in devices:
            devices.append(_device_name(name))
    if len(devices) < 2 or k < 2:
        return "local", f"{parts}, all on {devices[0]}: one process"
    where = f"{parts} on {len(devices)} devices ({_span(devices)})"
    if cfg.train.sigma_every:
        return "local", f"{where}, in one process: train.sigma_every needs every part there"
    return "distributed", where


def _device_name(name: str) -> str:
    """`cuda` is `cuda:0` and `cpu:0` is `cpu`; a name torch does not know is kept as written
    (building the parts names the error)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return name
    if device.type == "cpu":
        return "cpu"
    return f"{device.type}:{device.index or 0}"


def _span(devices: List[str]) -> str:
    """`cuda:0..3` for consecutive GPUs, else the list."""
    indices = [int(d[5:]) for d in devices if d.startswith("cuda:") and d[5:].isdigit()]
    if len(devices) > 2 and len(indices) == len(devices) \
            and indices == list(range(indices[0], indices[0] + len(indices))):
        return f"cuda:{indices[0]}..{indices[-1]}"
    return ", ".join(devices)


def executor_line(cfg: DictConfig) -> Tuple[str, str]:
    """The executor that runs `cfg` and the line that says so, e.g.
    `executor auto -> distributed: 4 parts on 4 devices (cuda:0..3)`."""
    name, reason = choose_executor(cfg)
    arrow = f" -> {name}" if name != cfg.executor else ""
    return name, f"executor {cfg.executor}{arrow}: {reason}"


def resolve_split(cfg: DictConfig, out_dir: Path, resume: bool, echo: Echo) -> DictConfig:
    """`split.auto` is measured once, before any worker starts, so every process and a later
    resume use the same partition; a resumed run keeps the points its first start chose."""
    if cfg.split.auto is None:
        return cfg
    if resume and (out_dir / "recipe.yaml").exists():
        saved = OmegaConf.load(out_dir / "recipe.yaml")
        merged = OmegaConf.merge(cfg, {"split": OmegaConf.to_container(saved.split)})
        OmegaConf.set_readonly(merged, True)
        return merged
    load_plugins(cfg.plugins)
    return resolve_auto_split(cfg, build_data(cfg.data, cfg.train.seed).info, echo)


def build(cfg: DictConfig, *, rank: Optional[int] = None, world_size: int = 1) -> Assembly:
    """Everything one process needs to train, built once. `rank` None: every part in this
    process; else the part of that rank, joined to the others through torch.distributed (the
    process group must be up)."""
    load_plugins(cfg.plugins)  # before the data: a recipe plugin may register the data set
    data = build_data(cfg.data, cfg.train.seed)
    k_parts = num_parts_requested(cfg) or 1
    if rank is not None and cfg.distributed.replicas > 1:  # this replica's K devices
        cfg = _replica_cfg(cfg, rank, k_parts)
    pipeline = build_pipeline(cfg, data.info, only_part=None if rank is None else rank % k_parts)
    if rank is None:
        probe = SigmaProbe(pipeline.algorithms, cfg.train.sigma_every) if cfg.train.sigma_every else None
        return Assembly(data, pipeline, LocalExecutor(pipeline.algorithms), probe)
    replicas = cfg.distributed.replicas
    if len(pipeline.parts) * replicas != world_size:
        raise FrzooError(f"the recipe splits the model into {len(pipeline.parts)} parts with "
                         f"distributed.replicas={replicas} but the job has {world_size} "
                         f"processes; run one process per part and replica "
                         f"({len(pipeline.parts) * replicas}).")
    layout = Layout(rank, len(pipeline.parts), replicas)
    device = pipeline.devices[layout.part]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replica = None
    if replicas > 1:
        _check_shards(data, replicas)
        replica = Replica.join(pipeline.algorithms[0], layout,
                               part_groups(layout, cfg.distributed.timeout_s),
                               sync_bn=cfg.distributed.sync_bn)
    executor = DistributedExecutor(pipeline.algorithms[0], rank, world_size, choose_backend(cfg),
                                   replica, timeout_s=cfg.distributed.timeout_s)
    return Assembly(data, pipeline, executor)


def _replica_cfg(cfg: DictConfig, rank: int, num_parts: int) -> DictConfig:
    """The recipe as replica rank // K sees it: `devices` cut to its K entries."""
    devices = replica_devices(cfg.devices, num_parts, cfg.distributed.replicas)[rank // num_parts]
    out = OmegaConf.merge(cfg, {"devices": devices})
    OmegaConf.set_readonly(out, True)
    return out  # type: ignore[return-value]


def _check_shards(data: DataModule, replicas: int) -> None:
    """Every replica needs rows in every step: the epoch's last, smaller batch too."""
    last = data.info.num_train % data.batch_size
    if not data.drop_last and 0 < last < replicas:
        raise FrzooError(f"the last batch of each epoch has {last} samples ({data.info.num_train} "
                         f"training samples, data.batch_size={data.batch_size}), fewer than "
                         f"distributed.replicas={replicas}: every replica needs at least one. "
                         f"Set data.drop_last=true or change data.batch_size.")


def train(cfg: DictConfig, out_dir: Path, *, resume: bool = False,
          loggers: Sequence[Logger] = (), echo: Echo = print,
          should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """Train the recipe into `out_dir` (resuming from its checkpoint if `resume`).

    `executor: local` runs every part in this process; `executor: distributed` runs one process
    per part (frzoo.executors.launch), each of which calls :func:`worker`; `auto` is one of the
    two (:func:`choose_executor`), written into the run's recipe as chosen. `should_stop` (local
    only, e.g. a sweep's early termination) is asked before each step; when it says yes the run
    stops as on Ctrl-C: checkpoint, summary, `interrupted: true`.
    """
    name, line = executor_line(cfg)
    echo(line)
    if name != cfg.executor:
        cfg = OmegaConf.merge(cfg, {"executor": name})  # type: ignore[assignment]
        OmegaConf.set_readonly(cfg, True)
    cfg = resolve_algorithm(cfg)  # its options are checked before anything starts
    cfg = resolve_split(cfg, out_dir, resume, echo)
    if name == "distributed":
        num_parts = num_parts_requested(cfg) or 1
        for devices in replica_devices(cfg.devices, num_parts, cfg.distributed.replicas):
            resolve_devices(devices, num_parts)  # fail before starting anything: count, existence
        return launch(cfg, out_dir, resume=resume, num_parts=num_parts, worker=worker)
    rundir.prepare(out_dir, resume)
    with rundir.lock(out_dir):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        run = build(cfg)
        return run_loop(cfg, out_dir, resume, pipeline=run.pipeline, data=run.data,
                        executor=run.executor, loggers=loggers, probe=run.probe,
                        should_stop=should_stop)


def worker(cfg: DictConfig, out_dir: Path, resume: bool, rank: int, world_size: int) -> None:
    """One process of a distributed job: build this rank's part and run the training loop.
    The launcher has set up the process group and holds the run folder's lock."""
    run = build(cfg, rank=rank, world_size=world_size)
    executor = run.executor
    echo = (lambda msg: print(f"frzoo: {msg}", file=sys.stderr, flush=True))
    loggers = build_loggers(cfg.logging, out_dir=out_dir, resume=resume, echo=echo) \
        if executor.is_leader else []
    try:
        run_loop(cfg, out_dir, resume, pipeline=run.pipeline, data=run.data, executor=executor,
                 loggers=loggers)
    except BaseException:
        close_loggers(loggers, failed=True)  # mark the tracker's run failed, then report
        raise
    # Only after success: after a failure a send may never complete, and waiting for it would
    # replace the real error by a second timeout.
    executor.close()


def evaluate(cfg: DictConfig, run_dir: Path, weights: Optional[Path] = None) -> Dict[str, float]:
    """Test metrics of a run: `weights` (a state_dict in the model's own names, default
    RUN_DIR/final.pt) or, where there is none, the run's last checkpoint."""
    from .checkpoint import load_file
    from .models import load_init_checkpoint
    run = build(cfg)
    weights = weights or run_dir / "final.pt"
    if weights.exists():
        load_init_checkpoint(run.pipeline.model, str(weights), what="--weights")  # weights only
    else:
        run.executor.load_checkpoint(load_file(rundir.checkpoint_path(run_dir)))
    return run.executor.evaluate(run.data)  # type: ignore[return-value]
