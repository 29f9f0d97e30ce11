"""The pipeline: the recipe's model cut into K parts, each on its device with its optimizer and
the algorithm that drives it (model, partition, devices, optimizers, algorithms).

Each step reads only its own recipe section. The split is checked against the whole model
before anything trains (see :func:`frzoo.split.check_equivalence`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import algorithms as _algorithms  # noqa: F401  (registers bp, fr)
from .algorithms.base import PartAlgorithm
from .algorithms.options import ignored_note, own_options, parse_options
from .data import DataInfo
from .errors import FrzooError
from .models import check_fits_data, create_model, load_init_checkpoint
from .optim import build_optimizer, part_lr_scales
from .precision import loss_scaler, prepare_part
from .plugins import ALGORITHMS, ARCHITECTURES, SPLIT_PRESETS, load_plugin
from .split import EquivalenceReport, Partition, SplitPart, balance, resolve


@dataclass
class Pipeline:
    """The model cut into parts on their devices, each with its optimizer and algorithm: what the
    training loop and `frzoo plan` need, built once from a recipe (:func:`build_pipeline`). A
    process that runs one part holds every part's modules but an algorithm for its own only."""
    model: nn.Module
    partition: Partition
    parts: List[SplitPart]
    devices: List[torch.device]
    report: EquivalenceReport
    algorithms: List[PartAlgorithm]  # the parts this process runs (all of them, or one)
    algorithm_cls: Any
    lr_scales: List[float]

    def table(self) -> List[Dict[str, Any]]:
        """Per part: modules, parameter count, output shape, device, history length, staleness."""
        k_parts = len(self.parts)
        return [{
            "part": k + 1,
            "modules": part.names,
            "params": sum(p.numel() for p in part.parameters()),
            "output_shape": _listed(self.report.shapes[k]) if k < len(self.report.shapes) else None,
            "device": str(self.devices[k]),
            "history": self.algorithm_cls.history_of(k, k_parts),
            "staleness": self.algorithm_cls.staleness_of(k, k_parts),
        } for k, part in enumerate(self.parts)]


def _listed(shape: Any) -> List[Any]:
    """A shape as a list; a multi-tensor cut's shapes as a list of lists (partition.json)."""
    return [_listed(s) if isinstance(s, tuple) else s for s in shape]


_LOADED: Set[Tuple[str, ...]] = set()  # the plugin lists this process has loaded


def load_plugins(names: Sequence[str]) -> None:
    """Import the recipe's plugins, once per process: the plan loads them before anything is
    built, and a later call with the same list (a worker's build, a check) returns at once."""
    key = tuple(names)
    if key in _LOADED:
        return
    for name in names:
        load_plugin(name)
    _LOADED.add(key)


def available_devices() -> List[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def resolve_devices(devices: Optional[Sequence[str]], num_parts: int) -> List[torch.device]:
    """One device per part; every device must exist here."""
    if devices is None:
        return [torch.device("cpu")] * num_parts
    devices = list(devices)
    if len(devices) != num_parts:
        raise FrzooError(f"devices lists {len(devices)} devices ({', '.join(devices)}) but the "
                         f"split has {num_parts} parts; give exactly one device per part.")
    here = available_devices()
    out = []
    for name in devices:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise FrzooError(f"device '{name}' is not a device name; available here: "
                             f"{', '.join(here)}.") from None
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        if str(dev) not in here:
            on_cpu = ",".join(["cpu"] * num_parts)
            raise FrzooError(f"device '{name}' does not exist on this machine; available here: "
                             f"{', '.join(here)}. To try the run on the CPU, set "
                             f"devices=[{on_cpu}].")
        out.append(dev)
    return out


def replica_devices(devices: Optional[Sequence[str]], num_parts: int,
                    replicas: int) -> List[List[str]]:
    """The K device names of each of the R replicas (`distributed.replicas`), replica-major.

    `devices` lists either K names, which every replica uses (CPU runs; one GPU per part on
    each node, where a replica is on one node), or K x R names: replica r's parts on entries
    r*K .. r*K+K-1. Each replica's list is then checked like a one-replica run's."""
    if devices is None:
        return [["cpu"] * num_parts for _ in range(replicas)]
    devices = [str(d) for d in devices]
    if replicas > 1 and len(devices) not in (num_parts, num_parts * replicas):
        raise FrzooError(
            f"devices lists {len(devices)} devices ({', '.join(devices)}) but the split has "
            f"{num_parts} parts and distributed.replicas={replicas}: give either {num_parts} "
            f"devices (every replica uses them, part k on the k-th) or {num_parts * replicas} "
            f"devices, replica-major (replica r's parts on entries r*{num_parts} .. "
            f"r*{num_parts}+{num_parts - 1}).")
    if len(devices) == num_parts or replicas == 1:
        return [devices] * replicas
    return [devices[r * num_parts:(r + 1) * num_parts] for r in range(replicas)]


def _accepts(fn: Any, key: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == key or p.kind is p.VAR_KEYWORD for p in params)


def model_kwargs(cfg_model: DictConfig, info: DataInfo) -> Dict[str, Any]:
    """The recipe's kwargs, with num_classes / in_chans taken from the data when not given."""
    kwargs = dict(cfg_model.kwargs)
    builder = ARCHITECTURES.get(cfg_model.name) if cfg_model.name in ARCHITECTURES else None
    for key, value in (("num_classes", info.num_classes), ("in_chans", info.channels)):
        if key not in kwargs and (builder is None or _accepts(builder, key)):
            kwargs[key] = value
    return kwargs


def build_model(cfg_model: DictConfig, info: DataInfo, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # every process builds the same initial weights
    model = create_model(cfg_model.name, model_kwargs(cfg_model, info))
    if cfg_model.init_checkpoint:
        load_init_checkpoint(model, cfg_model.init_checkpoint)
    return model


def num_parts_requested(cfg: DictConfig) -> Optional[int]:
    """K as the split section gives it, or the number of devices when the split says nothing."""
    split = cfg.split
    if split.parts is not None:
        return len(split.parts)
    if split.points is not None:
        return len(split.points) + 1
    if split.k is not None:
        return split.k
    return len(cfg.devices) if cfg.devices is not None else None


def build_partition(model: nn.Module, cfg: DictConfig) -> Partition:
    split = cfg.split
    k = num_parts_requested(cfg)
    presets = SPLIT_PRESETS.get(cfg.model.name) if cfg.model.name in SPLIT_PRESETS else None
    return resolve(
        model,
        points=list(split.points) if split.points is not None else None,
        parts=[list(p) for p in split.parts] if split.parts is not None else None,
        k=k, presets=presets).partition


def build_pipeline(cfg: DictConfig, info: DataInfo, *, check: bool = True,
                   only_part: Optional[int] = None, algorithm: Optional[Tuple[Any, Any]] = None,
                   model: Optional[nn.Module] = None,
                   devices: Optional[Sequence[str]] = None) -> Pipeline:
    """Model -> partition -> equivalence check -> parts on devices -> one algorithm per part.

    A process that runs a single part (`only_part`, 0-based) builds the whole model the same way
    (same seed, same check) but moves and wraps only its own part. A run's plan (frzoo.plan)
    passes what it resolved: the algorithm class and its options, the model it built (seeded,
    as :func:`build_model` makes it) and this process's replica's K `devices`; without them
    they come from the recipe (replica 0's devices).
    """
    if algorithm is None:
        load_plugins(cfg.plugins)
        algorithm = algorithm_of(cfg)  # once for all parts; a bad option fails here
    algo_cls, options = algorithm
    if model is None:
        model = build_model(cfg.model, info, cfg.train.seed)
    # One line naming both values, before the first step would fail inside a layer.
    check_fits_data(model, num_classes=info.num_classes, channels=info.channels,
                    image_size=info.image_size, data_name=info.name)
    partition = build_partition(model, cfg)
    sample = torch.randn(2, info.channels, info.image_size, info.image_size,
                         generator=torch.Generator().manual_seed(cfg.train.seed))
    # a chain split that fails the check is redone on the model's fx trace
    resolved = resolve(model, partition=partition, build=True, sample=sample if check else None)
    partition, parts = resolved.partition, resolved.parts or []
    report = resolved.report or EquivalenceReport()
    if check and not report.exact:
        raise _not_equivalent(cfg.model.name, report, parts)
    k_parts = partition.num_parts
    if devices is None:
        devices = replica_devices(cfg.devices, k_parts, cfg.distributed.replicas)[0]
    on = resolve_devices(devices, k_parts)
    scales = part_lr_scales(cfg.optimizer.part_lr_scale, k_parts)
    algos: List[PartAlgorithm] = []
    for index, (part, device) in enumerate(zip(parts, on)):
        if only_part is None or index == only_part:
            algos.append(_part_algorithm(cfg, algo_cls, options, part, index, k_parts, device))
    return Pipeline(model, partition, parts, on, report, algos, algo_cls, scales)


def _not_equivalent(model_name: str, report: EquivalenceReport,
                    parts: List[SplitPart]) -> FrzooError:
    """The one line that refuses a split whose parts do not compute what the model computes."""
    bad = report.first_bad_part()
    where = (report.problem if report.problem else
             f"part {bad + 1} ({parts[bad].names[0]} .. {parts[bad].names[-1]}) differs by "
             f"up to {report.max_abs_diff[bad]:.3g}")
    return FrzooError(
        f"the split parts of '{model_name}' do not compute what the whole model "
        f"computes: {where}. Its forward is probably not a chain of its children (functional "
        f"code or root-owned parameters between them); cut elsewhere, or train it unsplit."
        + (f" The traced (fx) split was refused too: {report.fallback_error}"
           if report.fallback_error else ""))


def _part_algorithm(cfg: DictConfig, algo_cls: Any, options: Any, part: SplitPart, index: int,
                    num_parts: int, device: torch.device) -> PartAlgorithm:
    """One part on its device, prepared for the recipe's precision, with its optimizer, its
    algorithm and its loss scaler."""
    last = index == num_parts - 1
    part.to(device).train()
    prepare_part(part, device, precision=cfg.train.precision,
                 memory_format=cfg.train.memory_format, compile=cfg.train.compile,
                 compile_backend=cfg.train.compile_backend, is_last=last)
    optimizer = build_optimizer(part.parameters(), cfg.optimizer)
    algo = _make_algorithm(algo_cls, part, optimizer, index, num_parts, device, cfg.train.seed,
                           options)
    algo.scaler = loss_scaler(cfg.train.precision, cfg.train.loss_scale, is_last=last)
    if cfg.train.measure_memory:
        algo.measure_memory()
    return algo


def algorithm_of(cfg: DictConfig) -> tuple[Any, Any]:
    """The recipe's algorithm class and its options, parsed from the `algorithm:` section by the
    class's own declaration (``cls.Options``, checked by OmegaConf): a bad value, or an option
    that no registered algorithm takes, is a RecipeError naming the class and the options it
    takes; an option of another registered algorithm is left out (frzoo.algorithms.options)."""
    name, cls, own, _ = _algorithm_section(cfg)
    return cls, parse_options(cls, own, name)


def _algorithm_section(cfg: DictConfig) -> tuple[str, Any, Dict[str, Any], Dict[str, Any]]:
    """(name, class, the options it takes, {option of another algorithm: its owners})."""
    given = OmegaConf.to_container(cfg.algorithm, resolve=True)
    name = given.pop("name")  # type: ignore[union-attr]
    cls = ALGORITHMS.get(name)
    registered = {other: ALGORITHMS.get(other) for other in ALGORITHMS.names()}
    own, ignored = own_options(cls, given, name, registered)  # type: ignore[arg-type]
    return name, cls, own, ignored


def resolve_algorithm(cfg: DictConfig) -> DictConfig:
    """The recipe with its `algorithm:` section checked and reduced to exactly the options the
    run uses: those of its algorithm, defaults filled in; another registered algorithm's options
    (fr's `warmup` under bp) are dropped with a one-line note. Called once, before anything
    trains or any worker starts, so that a bad option fails at once and recipe.yaml,
    checkpoints (and so resume checks) and W&B record every option the run used."""
    load_plugins(cfg.plugins)  # a recipe plugin may register the algorithm
    name, cls, own, ignored = _algorithm_section(cfg)
    options = parse_options(cls, own, name)
    if ignored:
        logging.getLogger("frzoo").warning(ignored_note(cls, name, ignored))
    resolved = cfg.copy()
    OmegaConf.set_readonly(resolved, False)
    resolved.algorithm = {"name": name, **asdict(options)}  # declaration order
    OmegaConf.set_readonly(resolved, True)
    return resolved


def _make_algorithm(cls: Any, part: nn.Module, optimizer: torch.optim.Optimizer, index: int,
                    num_parts: int, device: torch.device, seed: int, options: Any) -> PartAlgorithm:
    return cls(part, optimizer, index=index, num_parts=num_parts, device=device,
               loss_fn=torch.nn.functional.cross_entropy, seed=seed, options=options)


def auto_split(cfg: DictConfig, info: DataInfo, model: nn.Module, *, algorithm_cls: Any = None,
               threads: Optional[int] = None) -> Tuple[List[str], str]:
    """The split points `split.auto` chooses for `model` (measured on it: pass a copy that may
    be changed) under the cost model of `algorithm_cls` (default: the recipe's), and the line
    that says what was measured. `threads`: measure at the thread count each worker will have
    (None: this process's)."""
    k = num_parts_requested(cfg) or 1
    device = resolve_devices(replica_devices(cfg.devices, k, cfg.distributed.replicas)[0], k)[0]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sample = torch.randn(cfg.data.batch_size, info.channels, info.image_size, info.image_size,
                             generator=torch.Generator().manual_seed(cfg.train.seed))
        chosen = balance(model.to(device), k, by=cfg.split.auto,
                         algorithm=algorithm_cls or ALGORITHMS.get(cfg.algorithm.name),
                         sample=sample.to(device))
    finally:
        torch.set_num_threads(before)
    return chosen.points, (f"split.auto={cfg.split.auto}: points {chosen.points}; predicted cost "
                           f"per iteration under {cfg.algorithm.name}'s cost model: "
                           f"{chosen.describe()}")
