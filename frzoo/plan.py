"""The plan of a run: the recipe resolved once, before anything is built or any process starts.

:func:`make_plan` turns a loaded recipe into a frozen :class:`Plan`, in this order:

    plugins      loaded (once per process: a recipe plugin may register what follows)
    executor     `executor: auto` resolved: one process, or one process per part (and replica)
    algorithm    its class and typed options; the recipe completed with their defaults
    devices      each replica's K devices, checked to exist here
    run folder   checked (a fresh start needs a folder without a run, a resume a checkpoint);
                 created later, by the run that takes it (rundir.claim), so a refused run
                 leaves no folder behind
    split        `split.auto` measured once (a resumed run keeps the points it chose)

Everything after works from the plan: `frzoo run`, `frzoo plan`, `frzoo eval`, and every
process of a distributed job (spawned workers get the plan's resolved recipe from the launcher;
under torchrun the rank writing the run folder settles the split and shares it,
:func:`share_split`). Building (data, model, parts, executor: frzoo.run.build) then happens
once per process; the data and model that planning built for `split.auto` are handed to the
build (:class:`Materials`) instead of being built again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import rundir
from .data import DataModule, build_data
from .executors.elastic import share_from
from .executors.launch import under_torchrun
from .pipeline import (algorithm_of, auto_split, build_model, load_plugins, num_parts_requested,
                       replica_devices, resolve_algorithm, resolve_devices)


@dataclass(frozen=True)
class Plan:
    """A run, resolved. `cfg` is the resolved recipe (read-only) that recipe.yaml, checkpoints
    and W&B record: the executor as chosen, the algorithm's options complete, the split as
    points. The other fields say the same in typed form."""
    cfg: DictConfig
    executor: str  # local | distributed
    executor_line: str  # e.g. `executor auto -> distributed: 4 parts on 4 devices (cuda:0..3)`
    algorithm_cls: Any
    options: Any  # the algorithm's typed options
    num_parts: int  # K
    replicas: int  # R
    devices: Tuple[Tuple[str, ...], ...]  # replica r's K device names, replica-major
    out_dir: Optional[Path] = None
    resume: bool = False
    split_line: Optional[str] = None  # what split.auto measured and chose
    materials: Optional["Materials"] = field(default=None, compare=False, repr=False)

    @property
    def microbatches(self) -> int:
        """Micro-batches per step of a synchronous schedule (default K); 1 for the others."""
        if not self.algorithm_cls.runs_actions:
            return 1
        return getattr(self.options, "microbatches", None) or self.num_parts

    @property
    def world_size(self) -> int:
        return self.num_parts * self.replicas

    def part_devices(self, rank: Optional[int] = None) -> List[str]:
        """The K devices of the replica that process `rank` belongs to (None: replica 0)."""
        return list(self.devices[0 if rank is None else rank // self.num_parts])

    def describe(self) -> List[str]:
        """The plan as `frzoo plan` prints it, one line each."""
        lines = [self.executor_line,
                 f"algorithm {self.cfg.algorithm.name} ({self.algorithm_cls.__name__}): "
                 f"{self.options}" + (f"; {self.microbatches} micro-batches a step"
                                      if self.algorithm_cls.runs_actions
                                      else ""),
                 f"K={self.num_parts} parts x R={self.replicas} replica"
                 f"{'s' if self.replicas != 1 else ''} = {self.world_size} process"
                 f"{'es' if self.world_size != 1 else ''} when distributed"]
        lines += [f"replica {r} devices: {', '.join(d)}" for r, d in enumerate(self.devices)]
        if self.split_line:
            lines.append(self.split_line)
        if self.out_dir is not None:
            lines.append(f"run folder: {self.out_dir}{' (resumed)' if self.resume else ''}")
        return lines


class Materials:
    """The data and the model of one process, each built once: `split.auto` measures a copy of
    the model planning built, and the build takes that model instead of building another."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._data: Optional[DataModule] = None
        self._model: Optional[Tuple[nn.Module, Any]] = None

    def data(self) -> DataModule:
        if self._data is None:
            self._data = build_data(self.cfg.data, self.cfg.train.seed)
        return self._data

    def model(self) -> nn.Module:
        """The model as the recipe's seed makes it (built on first use)."""
        if self._model is None:
            model = build_model(self.cfg.model, self.data().info, self.cfg.train.seed)
            self._model = (model, _rng_state())
        return self._model[0]

    def take_model(self) -> Optional[nn.Module]:
        """Hand the model built so far to the build (None: none was built), with the random
        state as it was right after it was made, so that what follows draws the same numbers
        as if the build had made it."""
        if self._model is None:
            return None
        model, state = self._model
        self._model = None
        _set_rng_state(state)
        return model

    def release(self) -> None:
        """Drop what was built: a launcher that only planned keeps no model while its workers
        train."""
        self._data = self._model = None


def make_plan(cfg: DictConfig, out_dir: Optional[Path] = None, *, resume: bool = False) -> Plan:
    """The plan of `cfg` (see the module docstring). `out_dir`: the run folder, checked here and
    created later (None: a plan to look at, e.g. `frzoo plan`). Under torchrun the folder and
    `split.auto` are the business of the rank that writes the folder, after the job decides
    whether it resumes (frzoo.executors.elastic): they are left to :func:`share_split`."""
    load_plugins(cfg.plugins)  # before all else: a recipe plugin may register what follows
    name, line = executor_line(cfg)
    if name != cfg.executor:
        cfg = _merged(cfg, {"executor": name})
    cfg = resolve_algorithm(cfg)  # its options are checked before anything starts
    algorithm = algorithm_of(cfg)  # the class and its typed options, once
    num_parts = num_parts_requested(cfg) or 1
    devices = replica_devices(cfg.devices, num_parts, cfg.distributed.replicas)
    for names in devices:
        resolve_devices(names, num_parts)  # fail before anything starts: count, existence
    materials = Materials(cfg)
    split_line = None
    if not under_torchrun():
        if out_dir is not None:
            rundir.check(out_dir, resume)
        threads = (cfg.train.threads or max(1, torch.get_num_threads() // num_parts)
                   if name == "distributed" else None)  # the thread count of each worker
        cfg, split_line = settle_split(cfg, out_dir, resume, materials,
                                       algorithm_cls=algorithm[0], threads=threads)
    return _planned(cfg, line, out_dir, resume, split_line, materials, algorithm)


def resolved_plan(cfg: DictConfig, out_dir: Optional[Path] = None, *,
                  resume: bool = False) -> Plan:
    """The plan of a recipe that is already resolved (a worker's, the one a run folder holds):
    nothing is chosen or measured again."""
    load_plugins(cfg.plugins)
    return _planned(cfg, f"executor {cfg.executor}", out_dir, resume, None, Materials(cfg))


def _planned(cfg: DictConfig, line: str, out_dir: Optional[Path], resume: bool,
             split_line: Optional[str], materials: "Materials",
             algorithm: Optional[Tuple[Any, Any]] = None) -> Plan:
    algorithm_cls, options = algorithm or algorithm_of(cfg)
    num_parts = num_parts_requested(cfg) or 1
    devices = replica_devices(cfg.devices, num_parts, cfg.distributed.replicas)
    return Plan(cfg, cfg.executor, line, algorithm_cls, options, num_parts,
                cfg.distributed.replicas, tuple(tuple(d) for d in devices), out_dir, resume,
                split_line, materials)


def settle_split(cfg: DictConfig, out_dir: Optional[Path], resume: bool, materials: Materials,
                 *, algorithm_cls: Any = None,
                 threads: Optional[int] = None) -> Tuple[DictConfig, Optional[str]]:
    """`split.auto` replaced by the points it chooses, measured once (on a copy of the model the
    build will use), so every process and a later resume use the same partition; a resumed run
    keeps the points its first start chose. Returns the recipe and the line that says so."""
    if cfg.split.auto is None:
        return cfg, None
    saved = out_dir / "recipe.yaml" if out_dir is not None else None
    if resume and saved is not None and saved.exists():
        return _merged(cfg, {"split": OmegaConf.to_container(OmegaConf.load(saved).split)}), None
    model = copy.deepcopy(materials.model())  # the measurement may move and run it
    points, line = auto_split(cfg, materials.data().info, model, algorithm_cls=algorithm_cls,
                              threads=threads)
    return _merged(cfg, {"split": {"points": points, "auto": None, "k": None}}), line


def _merged(cfg: DictConfig, changes: Dict[str, Any]) -> DictConfig:
    out = OmegaConf.merge(cfg, changes)
    OmegaConf.set_readonly(out, True)
    return out  # type: ignore[return-value]


def _rng_state() -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: Tuple[torch.Tensor, Optional[List[torch.Tensor]]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


# ---------------------------------------------------------------- the executor
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


def share_split(plan: Plan, rank: int) -> Plan:
    """Under torchrun (collective, the process group up): the rank that writes the run folder
    settles `split.auto` (the saved points on resume, else measured) and every rank takes its
    points, so all parts cut the model at the same places."""
    leader = plan.num_parts - 1  # the rank writing the folder (frzoo.executors.launch)

    def settle() -> Tuple[Dict[str, Any], Optional[str]]:
        assert plan.materials is not None
        cfg, line = settle_split(plan.cfg, plan.out_dir, plan.resume, plan.materials,
                                 algorithm_cls=plan.algorithm_cls)
        return OmegaConf.to_container(cfg.split), line  # type: ignore[return-value]

    split, line = share_from(leader, settle)
    cfg = _merged(plan.cfg, {"split": split})
    return _planned(cfg, plan.executor_line, plan.out_dir, plan.resume,
                    line if rank == leader else None, plan.materials or Materials(cfg),
                    (plan.algorithm_cls, plan.options))
