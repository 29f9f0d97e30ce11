"""From a recipe to a run: the one place where a training job is put together.

`frzoo run`, `frzoo eval`, every process of a distributed job (spawned by frzoo or started by
torchrun) and the benchmarks assemble a run through these functions, in this order:

    make_plan   the recipe resolved once (frzoo.plan): plugins, executor, algorithm, devices,
                the run folder checked, split.auto measured
    build       from the plan, once per process: data -> model cut into parts -> the executor
                that runs them
    train       the run folder taken (created, locked), then the training loop (frzoo.trainer),
                here or in one process per part (frzoo.executors.launch)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from omegaconf import DictConfig

from . import preflight, rundir
from .data import DataModule
from .errors import FrzooError
from .messages import log
from .executors.base import Executor
from .executors.launch import choose_backend, launch, under_torchrun
from .executors.local import LocalExecutor
from .executors.p2p import DistributedExecutor
from .executors.replicas import Replica
from .executors.topology import Layout, part_groups
from .logging import Logger, build_loggers, close_loggers
from .pipeline import Pipeline, build_pipeline
from .plan import Materials, Plan, make_plan, resolved_plan, share_split
from .sigma import SigmaProbe
from .trainer import run_loop

__all__ = ["Assembly", "build", "evaluate", "make_plan", "train", "worker"]

@dataclass
class Assembly:
    """What one process runs: the data, its parts (all of them, or the one of its rank) and the
    executor that moves activations and deltas between them."""
    data: DataModule
    pipeline: Pipeline
    executor: Executor
    probe: Optional[SigmaProbe] = None  # train.sigma_every: a hook of the training loop


def build(plan: Union[Plan, DictConfig], *, rank: Optional[int] = None,
          world_size: int = 1) -> Assembly:
    """Everything one process needs to train, built once from the plan (a recipe is planned
    first). `rank` None: every part in this process; else the part of that rank, on its
    replica's devices, joined to the others through torch.distributed (the group must be up)."""
    if not isinstance(plan, Plan):
        plan = make_plan(plan)
    materials = plan.materials or Materials(plan.cfg)
    data = materials.data()
    preflight.check_shards(plan.cfg, data.info, plan.microbatches)  # here: the local executor; workers: checked again
    pipeline = build_pipeline(plan.cfg, data.info, only_part=None if rank is None
                              else rank % plan.num_parts,
                              algorithm=(plan.algorithm_cls, plan.options),
                              model=materials.take_model(), devices=plan.part_devices(rank))
    cfg = plan.cfg
    if rank is None:
        probe = SigmaProbe(pipeline.algorithms, cfg.train.sigma_every) if cfg.train.sigma_every else None
        return Assembly(data, pipeline, LocalExecutor(pipeline.algorithms), probe)
    if plan.world_size != world_size:
        raise FrzooError(f"the recipe splits the model into {plan.num_parts} parts with "
                         f"distributed.replicas={plan.replicas} but the job has {world_size} "
                         f"processes; run one process per part and replica "
                         f"({plan.world_size}).")
    layout = Layout(rank, plan.num_parts, plan.replicas)
    device = pipeline.devices[layout.part]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replica = None
    if plan.replicas > 1:
        replica = Replica.join(pipeline.algorithms[0], layout,
                               part_groups(layout, cfg.distributed.timeout_s),
                               sync_bn=cfg.distributed.sync_bn,
                               timeout_s=cfg.distributed.timeout_s)
    executor = DistributedExecutor(pipeline.algorithms[0], rank, world_size, choose_backend(cfg),
                                   replica, timeout_s=cfg.distributed.timeout_s,
                                   checkpoint_async=cfg.train.checkpoint_async)
    return Assembly(data, pipeline, executor)




def train(cfg: DictConfig, out_dir: Path, *, resume: bool = False,
          loggers: Optional[Sequence[Logger]] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """Train the recipe into `out_dir` (resuming from its checkpoint if `resume`).

    The recipe is planned first (frzoo.plan): `executor: local` then runs every part in this
    process; `executor: distributed` runs one process per part (frzoo.executors.launch), each of
    which calls :func:`worker`; `auto` is one of the two, written into the run's recipe as
    chosen. `loggers`: the trackers to log to (None: those of the recipe's `logging:`).
    `should_stop` (local only, e.g. a sweep's early termination) is asked before each step; when
    it says yes the run stops as on Ctrl-C: checkpoint, summary, `interrupted: true`.
    """
    preflight.check_resume(cfg, out_dir, resume, log.info)  # before anything is resolved
    plan = make_plan(cfg, out_dir, resume=resume)
    log.info(plan.executor_line)
    if plan.split_line:
        log.info(plan.split_line)
    if plan.executor == "distributed":
        info = plan.materials.data().info if plan.materials is not None else None
        preflight.check_shards(plan.cfg, info, plan.microbatches)  # every batch fits every replica: before any process
        if plan.materials is not None:
            plan.materials.release()
        return launch(plan.cfg, out_dir, resume=resume, num_parts=plan.num_parts, worker=worker)
    if plan.cfg.train.threads:
        torch.set_num_threads(plan.cfg.train.threads)
    run = build(plan)  # before the folder is taken: a recipe refused here leaves none behind
    with rundir.claim(out_dir, resume):
        return _train_here(plan, run, loggers, should_stop)


def _train_here(plan: Plan, run: Assembly, loggers: Optional[Sequence[Logger]],
                should_stop: Optional[Callable[[], bool]]) -> Dict[str, Any]:
    """The training loop in this process, its trackers marked failed if it fails."""
    assert plan.out_dir is not None
    if loggers is None:
        loggers = build_loggers(plan.cfg.logging, out_dir=plan.out_dir, resume=plan.resume,
                                echo=log.info)
    try:
        return run_loop(plan.cfg, plan.out_dir, plan.resume, pipeline=run.pipeline,
                        data=run.data, executor=run.executor, loggers=loggers, probe=run.probe,
                        should_stop=should_stop)
    except BaseException:
        close_loggers(loggers, failed=True)  # mark the tracker's run failed, then report
        raise


def worker(cfg: DictConfig, out_dir: Path, resume: bool, rank: int, world_size: int) -> None:
    """One process of a distributed job: build this rank's part and run the training loop.
    `cfg` is the plan's resolved recipe, from the launcher (which holds the run folder's lock)
    or, under torchrun, this process's own plan (the split then settled by the folder's writer).
    """
    plan = resolved_plan(cfg, out_dir, resume=resume)
    if under_torchrun() and cfg.split.auto is not None:
        plan = share_split(plan, rank)
        if plan.split_line:
            log.info(plan.split_line)
    run = build(plan, rank=rank, world_size=world_size)
    executor = run.executor
    loggers = build_loggers(cfg.logging, out_dir=out_dir, resume=resume, echo=log.info) \
        if executor.is_leader else []
    try:
        run_loop(plan.cfg, out_dir, resume, pipeline=run.pipeline, data=run.data,
                 executor=executor, loggers=loggers)
    except BaseException:
        close_loggers(loggers, failed=True)  # mark the tracker's run failed, then report
        raise
    # Only after success: after a failure a send may never complete, and waiting for it would
    # replace the real error by a second timeout.
    executor.close()


def evaluate(cfg: DictConfig, run_dir: Path, weights: Optional[Path] = None) -> Dict[str, float]:
    """Test metrics of a run: `weights` (a state_dict in the model's own names, default
    RUN_DIR/final.pt) or, where there is none, the run's last checkpoint. `cfg` is the run's
    recipe, resolved when the run started: nothing is chosen or measured again."""
    from .checkpoint import open_checkpoint
    from .models import load_init_checkpoint
    run = build(resolved_plan(cfg, run_dir))
    weights = weights or run_dir / "final.pt"
    if weights.exists():
        load_init_checkpoint(run.pipeline.model, str(weights), what="--weights")  # weights only
    else:
        run.executor.load_checkpoint(open_checkpoint(rundir.checkpoint_path(run_dir)))
    return run.executor.evaluate(run.data)  # type: ignore[return-value]

