"""The typed recipe schema, `_base_` inheritance, CLI overrides and validation.

A recipe is a YAML file that overrides the dataclass defaults below. Precedence, lowest first:
schema defaults < `_base_` recipe(s) < the recipe < CLI ``dotted.key=value`` overrides.
Unknown keys and wrong types fail with the key's full path and the closest valid key.
Each component receives only its own section (``cfg.data``, ``cfg.optimizer`` ...), never the
whole recipe; see docs/recipes.md for every key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import RecipeError


@dataclass
class ModelConfig:
    name: str = "???"
    # Passed to timm.create_model (or the plugin architecture). num_classes and in_chans default
    # to the data set's when not given here.
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # Optional state_dict (in the model's own parameter names) to start from.
    init_checkpoint: Optional[str] = None


@dataclass
class SplitConfig:
    # Cut before each named module, any depth (`layer3.12`). K = len(points) + 1.
    points: Optional[List[str]] = None
    # Or: explicit module names per part. K = len(parts).
    parts: Optional[List[List[str]]] = None
    # Or neither: K contiguous chunks of the block list (ceil(n/K) blocks each, the authors' rule),
    # or the architecture's registered preset for this K.
    k: Optional[int] = None
    # With k (or one device per part): choose the K-1 cuts that minimise the busiest part's cost,
    # by `time` (forward and backward of each block measured at the recipe's batch size, with
    # the algorithm's cost model), `flops`, `params` or `memory` (parameters, momentum,
    # activations and the algorithm's history: part k of fr holds K-k+1 inputs).
    auto: Optional[Literal["time", "flops", "params", "memory"]] = None


@dataclass
class ScheduleConfig:
    name: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: List[float] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0 to the base lr
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the base lr


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # One multiplier per part, e.g. [2, 1, 1, 1] as in the authors' code. None = all 1.
    part_lr_scale: Optional[List[float]] = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # cifar10 | cifar100 | digits | npz | imagefolder | synthetic
    root: str = "data"
    download: bool = False
    path: Optional[str] = None  # npz: the file with x, y (and optional x_test, y_test)
    test_path: Optional[str] = None  # npz: a second file with the test arrays
    batch_size: int = 128
    eval_batch_size: Optional[int] = None  # default: batch_size
    image_size: Optional[int] = None  # resize to this side; default: the data set's own
    # standard: random crop (pad 4) + horizontal flip; crop; none
    augment: Literal["standard", "crop", "none"] = "standard"
    normalize: bool = True
    shuffle: bool = True
    num_workers: int = 0
    drop_last: bool = False
    limit_train: Optional[int] = None  # use only the first N training samples
    limit_test: Optional[int] = None
    # synthetic only
    num_classes: int = 10
    num_train: int = 512
    num_test: int = 128
    channels: int = 3


@dataclass
class LossScaleConfig:
    """fp16 loss scaling (frzoo/loss_scale.py): the first scale and how many steps in a row
    without overflow double it (an overflow halves it), GradScaler's defaults."""
    init: float = 65536.0
    growth_interval: int = 2000


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many steps in all (overrides epochs)
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only at the end
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    log_every: int = 10  # steps between metrics.jsonl records
    threads: Optional[int] = None  # torch.set_num_threads; None = torch's default
    # Count, per part, the bytes kept for backward (saved tensors + history; exact, CPU too).
    measure_memory: bool = False
    # Every N steps, compare each part's update with the true gradient on the same sample
    # (sigma, logged as partK/sigma over each log interval). 0 = off. Every part in one process:
    # executor auto then chooses local.
    sigma_every: int = 0
    progress: bool = True
    # How each part computes (frzoo/precision.py): autocast dtype (parameters stay fp32), the
    # layout of weights and activations, and torch.compile per part with this backend.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)  # fp16 only
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class RunConfig:
    out_dir: Optional[str] = None  # default: runs/<recipe name>-<time>
    resume: Optional[str] = None  # a run folder to continue


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "frzoo"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # auto: online when a W&B API key is configured, else offline (see docs/wandb.md)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    log_model: bool = False  # upload final.pt as a W&B "model" artifact


@dataclass
class DistributedConfig:
    """One process per part on torch.distributed (`executor: distributed`, or `auto` with the
    parts on several devices)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when every part is on CUDA, else gloo
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port (single node); torchrun sets its own
    # A part that waits longer than this for a neighbour fails the job (a stalled or dead peer).
    timeout_s: float = 120.0
    # Data-parallel copies of the K-part pipeline: R x K processes, rank = replica * K + part;
    # each replica takes data.batch_size / R rows of every batch and the R copies of each part
    # sum their (share-weighted) gradients before the step (docs/distributed.md).
    replicas: int = 1
    # Normalise BatchNorm with the statistics of the whole global batch: the R copies of a part
    # all-reduce them (play and replay alike). Off: each replica normalises with its own rows.
    sync_bn: bool = False


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    devices: Optional[List[str]] = None  # one per part; None = every part on cpu
    # `name` (fr | bp | ddg, plugins may add more) plus the options that algorithm declares
    # (fr: warmup, replay_bn). An open section: the algorithm class checks its options when the
    # run is built (frzoo.algorithms.options), since a plugin's algorithm brings its own.
    algorithm: Dict[str, Any] = field(default_factory=lambda: {"name": "fr"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # auto: one process per part when the parts sit on two or more devices, else one process
    # (frzoo.run.choose_executor); local: all parts in this process; distributed: one per part
    executor: Literal["auto", "local", "distributed"] = "auto"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    plugins: List[str] = field(default_factory=list)


def _choices(schema: type, prefix: str = "") -> Dict[str, Sequence[str]]:
    """{dotted key: its choices} of every Literal-typed field in the schema: the schema is the
    one place a choice is written down; merging a layer checks it (see _merge)."""
    out: Dict[str, Sequence[str]] = {}
    for f in dataclasses.fields(schema):
        inner = typing.get_type_hints(schema)[f.name]
        if typing.get_origin(inner) is typing.Union:  # Optional[X]: X
            inner = next(a for a in typing.get_args(inner) if a is not type(None))
        if typing.get_origin(inner) is Literal:
            out[prefix + f.name] = typing.get_args(inner)
        elif dataclasses.is_dataclass(inner):
            out.update(_choices(inner, f"{prefix}{f.name}."))
    return out


CHOICES: Dict[str, Sequence[str]] = _choices(Recipe)


def _not_a_choice(key: str, value: Any) -> str:
    choices = CHOICES[key]
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{key}={value!r} is not one of {', '.join(map(str, choices))}.{hint}"


# ---------------------------------------------------------------- loading
def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"recipe '{path}' is not valid YAML{at}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of keys to values, "
                          f"not a {type(data).__name__}.")
    return data


def _load_with_bases(path: Path, chain: Sequence[Path] = ()) -> List[Dict[str, Any]]:
    """The recipe and its `_base_` ancestors, oldest first."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe `_base_` includes form a cycle: {cycle}. Remove one `_base_`.")
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
    if bases is None:
        return [data]
    layers: List[Dict[str, Any]] = []
    for base in [bases] if isinstance(bases, str) else list(bases):
        layers += _load_with_bases((path.parent / str(base)), (*chain, path))
    return layers + [data]


def _closest_key(cfg: DictConfig, full_key: str) -> str:
    parent_path, _, leaf = full_key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    except Exception:  # noqa: BLE001
        parent = None
    keys = list(parent.keys()) if isinstance(parent, DictConfig) else []
    close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{parent_path + '.' if parent_path else ''}{close[0]}'?"
    return f" Valid keys here: {', '.join(map(str, keys))}." if keys else ""


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None) or "?"
        if isinstance(exc, ConfigKeyError) or "not in" in str(exc):
            raise RecipeError(f"{source}: unknown key '{key}'.{_closest_key(base, str(key))}") from None
        if key in CHOICES:  # a Literal field: say it as every choice error is said
            value = OmegaConf.select(OmegaConf.create(layer), str(key))
            raise RecipeError(_not_a_choice(str(key), value)) from None
        msg = str(exc).splitlines()[0]
        raise RecipeError(f"{source}: bad value for '{key}': {msg}") from None


def load_recipe(path: Optional[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults < bases < recipe < overrides, validated. Returns a read-only config."""
    cfg: DictConfig = OmegaConf.structured(Recipe)
    if path is not None:
        for layer in _load_with_bases(Path(path)):
            cfg = _merge(cfg, layer, f"recipe '{path}'")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like dotted.key=value "
                              f"(e.g. optimizer.lr=0.1).")
        try:
            layer = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RecipeError(f"override '{item}' could not be parsed ({first}); write it as "
                              f"dotted.key=value with a YAML value, quoted if it has spaces "
                              f"or brackets.") from None
        cfg = _merge(cfg, layer, f"override '{item}'")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks the schema's types cannot express. Errors name the key, the rule and the fix."""
    if OmegaConf.is_missing(cfg.model, "name"):
        raise RecipeError("model.name is required: a timm model name or a registered "
                          "architecture (list them with `frzoo models`).")
    name = cfg.algorithm.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"algorithm.name={name!r} must be the name of an algorithm: fr, bp, "
                          f"ddg or one a plugin registers.")
    def positive(key: str, allow_zero: bool = False, allow_none: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            rule = "zero or more" if allow_zero else "positive"
            raise RecipeError(f"{key}={value} must be {rule}.")

    positive("data.batch_size")
    positive("data.eval_batch_size", allow_none=True)
    positive("data.image_size", allow_none=True)
    positive("data.num_workers", allow_zero=True)
    positive("data.limit_train", allow_none=True)
    positive("data.limit_test", allow_none=True)
    for key in ("num_classes", "num_train", "num_test", "channels"):  # the synthetic data set's
        positive(f"data.{key}")
    positive("train.epochs")
    positive("train.max_steps", allow_none=True)
    positive("train.eval_every", allow_zero=True)
    positive("train.checkpoint_every", allow_zero=True)
    positive("train.log_every")
    positive("train.threads", allow_none=True)
    positive("optimizer.lr", allow_zero=True)
    positive("distributed.timeout_s")
    positive("train.sigma_every", allow_zero=True)
    if cfg.train.sigma_every and cfg.executor == "distributed":  # auto resolves to local then
        raise RecipeError("train.sigma_every needs the whole model in one process: use "
                          "executor=local (or auto) for sigma measurements.")
    positive("distributed.master_port", allow_zero=True)
    _validate_replicas(cfg)
    positive("optimizer.weight_decay", allow_zero=True)
    positive("optimizer.momentum", allow_zero=True)
    positive("train.loss_scale.init")
    positive("train.loss_scale.growth_interval")
    if not math.isfinite(cfg.train.loss_scale.init):
        raise RecipeError(f"train.loss_scale.init={cfg.train.loss_scale.init} must be finite "
                          f"(fp16's largest value is 65504; the default is 65536).")
    if cfg.optimizer.nesterov and cfg.optimizer.momentum <= 0:
        raise RecipeError("optimizer.nesterov=true needs optimizer.momentum > 0.")
    if len(cfg.optimizer.betas) != 2:
        raise RecipeError(f"optimizer.betas={list(cfg.optimizer.betas)} must have two values.")
    split = cfg.split
    given = [name for name in ("points", "parts") if split[name] is not None]
    if split.k is not None and split.auto is None:
        given.append("k")
    if len(given) > 1:
        raise RecipeError(f"split: give only one of points, parts or k (got {', '.join(given)}).")
    if split.k is not None and split.k < 1:
        raise RecipeError(f"split.k={split.k} must be at least 1.")
    if split.auto is not None:
        if split.points is not None or split.parts is not None:
            raise RecipeError("split.auto chooses the points itself: remove split.points/parts.")
        if split.k is None and cfg.devices is None:
            raise RecipeError("split.auto needs the number of parts: set split.k or devices.")
    if split.parts is not None and any(len(p) == 0 for p in split.parts):
        raise RecipeError("split.parts: every part needs at least one module name.")


def _validate_replicas(cfg: DictConfig) -> None:
    """distributed.replicas: what the schema's types cannot say (the devices' count is checked
    with the split, when K is known: frzoo.pipeline.replica_devices)."""
    replicas = cfg.distributed.replicas
    if replicas < 1:
        raise RecipeError(f"distributed.replicas={replicas} must be at least 1 (1: one copy of "
                          f"the pipeline, no data parallelism).")
    if replicas == 1:
        return
    if cfg.data.batch_size % replicas:
        raise RecipeError(f"data.batch_size={cfg.data.batch_size} is the global batch and must "
                          f"divide into distributed.replicas={replicas} equal shares; choose a "
                          f"batch size that is a multiple of {replicas}.")
    if cfg.executor == "local":
        raise RecipeError(f"distributed.replicas={replicas} runs {replicas} copies of the "
                          f"pipeline, one process per part each: use executor=distributed (or "
                          f"auto), not executor=local.")
    if cfg.train.sigma_every:
        raise RecipeError(f"train.sigma_every needs the whole model in one process; it cannot "
                          f"run with distributed.replicas={replicas}. Set train.sigma_every=0 or "
                          f"distributed.replicas=1.")


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_recipe(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def recipe_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> Dict[str, tuple]:
    """{dotted key: (old, new)} for every leaf that differs."""
    out: Dict[str, tuple] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(recipe_diff(a, b, path + "."))
        elif a != b:
            out[path] = (a, b)
    return out


__all__ = ["Recipe", "load_recipe", "validate", "save_recipe", "to_container", "recipe_diff",
           "DictConfig", "ListConfig"]
