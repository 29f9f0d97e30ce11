"""The typed recipe schema, `_base_` inheritance, CLI overrides and validation.

A recipe is a YAML file that overrides the dataclass defaults below. Precedence, lowest first:
schema defaults < `_base_` recipe(s) < the recipe < CLI ``dotted.key=value`` overrides (and
``~dotted.key``, which removes a key). Unknown keys and wrong types fail with the key's full path
and the closest valid key. Each section states its value rules beside its fields
(frzoo.rules: ``positive(128)``) and in its ``__post_init__``; OmegaConf builds the sections
from the merged layers (``OmegaConf.to_object``), which runs them once. Each component receives
only its own section (``cfg.data``, ``cfg.optimizer`` ...), never the whole recipe; see
docs/recipes.md for every key.
"""
from __future__ import annotations

import dataclasses
import difflib
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)

from .errors import FrzooError, RecipeError, shorten
from .rules import Range, at_least, between, check_fields, positive, ranged


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
    k: Optional[int] = at_least(1, None)
    # With k (or one device per part): choose the K-1 cuts that minimise the busiest part's cost,
    # by `time` (forward and backward of each block measured at the recipe's batch size, with
    # the algorithm's cost model), `flops`, `params` or `memory` (parameters, momentum,
    # activations and the algorithm's history: part k of fr holds K-k+1 inputs).
    auto: Optional[Literal["time", "flops", "params", "memory"]] = None

    def __post_init__(self) -> None:
        check_fields(self, "split")
        given = [name for name in ("points", "parts") if getattr(self, name) is not None]
        if self.k is not None and self.auto is None:
            given.append("k")
        if len(given) > 1:
            raise RecipeError(f"split: give only one of points, parts or k (got "
                              f"{', '.join(given)}).")
        if self.auto is not None and (self.points is not None or self.parts is not None):
            raise RecipeError("split.auto chooses the points itself: remove split.points/parts.")
        if self.parts is not None and any(len(p) == 0 for p in self.parts):
            raise RecipeError("split.parts: every part needs at least one module name.")


@dataclass
class ScheduleConfig:
    name: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: List[float] = ranged([], Range(low=0))  # epochs, for multistep
    gamma: float = at_least(0.0, 0.1)
    warmup_epochs: float = at_least(0.0, 0.0)  # linear warm-up from 0 to the base lr
    min_lr_ratio: float = between(0, 1, 0.0)  # cosine floor, as a fraction of the base lr

    def __post_init__(self) -> None:
        check_fields(self, "optimizer.schedule")


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = at_least(0.0, 0.01)
    momentum: float = at_least(0.0, 0.9)
    nesterov: bool = False
    weight_decay: float = at_least(0.0, 5e-4)
    betas: List[float] = ranged([0.9, 0.999], Range(low=0, high=1, open_high=True))
    eps: float = at_least(0.0, 1e-8)
    # One multiplier per part, e.g. [2, 1, 1, 1] as in the authors' code. None = all 1.
    part_lr_scale: Optional[List[float]] = at_least(0.0, None)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check_fields(self, "optimizer")
        if self.nesterov and self.momentum <= 0:
            raise RecipeError("optimizer.nesterov=true needs optimizer.momentum > 0.")
        if len(self.betas) != 2:
            raise RecipeError(f"optimizer.betas={shorten(list(self.betas))} must have two values.")


@dataclass
class DataConfig:
    name: str = "synthetic"  # cifar10 | cifar100 | digits | npz | imagefolder | synthetic
    root: str = "data"
    download: bool = False
    path: Optional[str] = None  # npz: the file with x, y (and optional x_test, y_test)
    test_path: Optional[str] = None  # npz: a second file with the test arrays
    batch_size: int = positive(128)
    eval_batch_size: Optional[int] = positive(None)  # default: batch_size
    image_size: Optional[int] = positive(None)  # resize to this side; default: the data set's own
    # standard: random crop (pad 4) + horizontal flip; crop; none
    augment: Literal["standard", "crop", "none"] = "standard"
    normalize: bool = True
    shuffle: bool = True
    num_workers: int = at_least(0, 0)
    drop_last: bool = False
    limit_train: Optional[int] = positive(None)  # use only the first N training samples
    limit_test: Optional[int] = positive(None)
    # synthetic only
    num_classes: int = positive(10)
    num_train: int = positive(512)
    num_test: int = positive(128)
    channels: int = positive(3)

    def __post_init__(self) -> None:
        check_fields(self, "data")


@dataclass
class LossScaleConfig:
    """fp16 loss scaling (frzoo/loss_scale.py): the first scale and how many steps in a row
    without overflow double it (an overflow halves it), GradScaler's defaults."""
    init: float = positive(65536.0)  # fp16's largest value is 65504
    growth_interval: int = positive(2000)

    def __post_init__(self) -> None:
        check_fields(self, "train.loss_scale")


@dataclass
class TraceConfig:
    """`train.trace`: record the timeline of steps start .. start + steps - 1 (0-based) on every
    rank and write RUN_DIR/trace.json (frzoo/timeline.py, docs/timeline.md)."""
    start: int = at_least(0, 0)
    steps: int = positive(5)

    def __post_init__(self) -> None:
        check_fields(self, "train.trace")


@dataclass
class TrainConfig:
    epochs: int = positive(1)
    max_steps: Optional[int] = positive(None)  # stop after this many steps (overrides epochs)
    seed: int = between(-2**63, 2**63 - 1, 0, note="what torch.manual_seed takes")
    eval_every: int = at_least(0, 1)  # epochs; 0 = only at the end
    checkpoint_every: int = at_least(0, 0)  # steps; 0 = at the end of each epoch only
    checkpoint_async: bool = False  # write checkpoints in a background thread (DCP async_save)
    log_every: int = positive(10)  # steps between metrics.jsonl records
    threads: Optional[int] = positive(None)  # torch.set_num_threads; None = torch's default
    # Count, per part, the bytes kept for backward (saved tensors + history; exact, CPU too).
    measure_memory: bool = False
    # Every N steps, compare each part's update with the true gradient on the same sample
    # (sigma, logged as partK/sigma over each log interval). 0 = off. Every part in one process:
    # executor auto then chooses local.
    sigma_every: int = at_least(0, 0)
    progress: bool = True
    # How each part computes (frzoo/precision.py): autocast dtype (parameters stay fp32), the
    # layout of weights and activations, and torch.compile per part with this backend.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)  # fp16 only
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    compile: bool = False
    compile_backend: str = "inductor"
    # The timeline of a few steps (e.g. {start: 20, steps: 5}) as RUN_DIR/trace.json; null: off.
    trace: Optional[TraceConfig] = None

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if self.compile:
            check_compile_backend(self.compile_backend)


def check_compile_backend(name: str) -> None:
    """A backend torch.compile knows (torch._dynamo's registry, debug ones such as `eager`
    included), checked when the recipe loads rather than by a dynamo traceback at the first
    step. Imports torch._dynamo (about a second), so only recipes that compile pay for it."""
    import torch._dynamo  # noqa: PLC0415
    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        usual = [*torch._dynamo.list_backends(), "eager", "aot_eager"]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"train.compile_backend={shorten(name)} is not a torch.compile backend "
                          f"here; known: {', '.join(sorted(set(usual)))} (and torch's debug "
                          f"backends).{hint}")


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
    master_addr: str = "127.0.0.1"  # resolved before any process starts: check_master_addr
    master_port: int = between(0, 65535, 0, note="0: pick a free port")  # torchrun sets its own
    # A part that waits longer than this for a neighbour fails the job (a stalled or dead peer).
    timeout_s: float = ranged(120.0, Range(low=0, open_low=True, high=31_536_000,
                                           note="seconds; a year at most"))
    # Data-parallel copies of the K-part pipeline: R x K processes, rank = replica * K + part;
    # each replica takes data.batch_size / R rows of every batch and the R copies of each part
    # sum their (share-weighted) gradients before the step (docs/distributed.md).
    replicas: int = at_least(1, 1, note="1: one copy of the pipeline, no data parallelism")
    # Normalise BatchNorm with the statistics of the whole global batch: the R copies of a part
    # all-reduce them (play and replay alike). Off: each replica normalises with its own rows.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "distributed")


def check_master_addr(addr: str) -> None:
    """`distributed.master_addr` names an address of this machine: it resolves, and a socket
    binds to it. The launcher calls this before it spawns anything (it starts every process
    here), so a typo in the host name is named as such, not as a problem with the port."""
    try:
        family, *_, sockaddr = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FrzooError(f"distributed.master_addr={shorten(addr)} does not resolve to an "
                         f"address ({reason}); give this machine's IP address or host name "
                         f"(127.0.0.1 runs every process here).") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((sockaddr[0], 0))
    except OSError as exc:
        raise FrzooError(f"distributed.master_addr={shorten(addr)} ({sockaddr[0]}) is not an "
                         f"address of this machine ({exc.strerror}); `frzoo run` starts every "
                         f"process here: use 127.0.0.1, or torchrun for several nodes "
                         f"(docs/distributed.md).") from None


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
    # (frzoo.plan.choose_executor); local: all parts in this process; distributed: one per part
    executor: Literal["auto", "local", "distributed"] = "auto"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    plugins: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """The rules that tie sections together (each section checked its own fields)."""
        name = self.algorithm.get("name")
        if not isinstance(name, str) or not name:
            raise RecipeError(f"algorithm.name={shorten(name)} must be the name of an algorithm: "
                              f"fr, bp, ddg or one a plugin registers.")
        if self.train.sigma_every and self.executor == "distributed":  # auto resolves to local
            raise RecipeError("train.sigma_every needs the whole model in one process: use "
                              "executor=local (or auto) for sigma measurements.")
        if self.split.auto is not None and self.split.k is None and self.devices is None:
            raise RecipeError("split.auto needs the number of parts: set split.k or devices.")
        self._check_replicas()

    def _check_replicas(self) -> None:
        """distributed.replicas > 1 against the batch, the executor and sigma (the devices'
        count is checked with the split, when K is known: frzoo.pipeline.replica_devices)."""
        replicas = self.distributed.replicas
        if replicas == 1:
            return
        if self.data.batch_size % replicas:
            raise RecipeError(f"data.batch_size={self.data.batch_size} is the global batch and "
                              f"must divide into distributed.replicas={replicas} equal shares; "
                              f"choose a batch size that is a multiple of {replicas}.")
        if self.executor == "local":
            raise RecipeError(f"distributed.replicas={replicas} runs {replicas} copies of the "
                              f"pipeline, one process per part each: use executor=distributed "
                              f"(or auto), not executor=local.")
        if self.train.sigma_every:
            raise RecipeError(f"train.sigma_every needs the whole model in one process; it cannot "
                              f"run with distributed.replicas={replicas}. Set train.sigma_every=0 "
                              f"or distributed.replicas=1.")


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


def _sections(schema: type, prefix: str = "") -> Dict[str, tuple]:
    """{dotted key: (its field names, whether it may be null)} of every section of the schema
    (a dataclass-typed field): a scalar given for one is said as such (see _merge)."""
    out: Dict[str, tuple] = {}
    for f in dataclasses.fields(schema):
        inner = typing.get_type_hints(schema)[f.name]
        optional = typing.get_origin(inner) is typing.Union
        if optional:
            inner = next(a for a in typing.get_args(inner) if a is not type(None))
        if dataclasses.is_dataclass(inner):
            out[prefix + f.name] = (tuple(g.name for g in dataclasses.fields(inner)), optional)
            out.update(_sections(inner, f"{prefix}{f.name}."))
    return out


SECTIONS: Dict[str, tuple] = _sections(Recipe)


def _not_a_section(layer: Any) -> Optional[str]:
    """The error for the first section of `layer` given a value that is not a mapping."""
    tree = OmegaConf.create(layer)
    for key, (names, optional) in SECTIONS.items():
        value = OmegaConf.select(tree, key, default=None)
        if value is not None and not isinstance(value, DictConfig):
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            return (f"{key}={shorten(value)} must be a mapping of its keys ({', '.join(names)})"
                    + (", or null (off)." if optional else "."))
    return None


def _not_a_choice(key: str, value: Any) -> str:
    choices = CHOICES[key]
    close = difflib.get_close_matches(str(value)[:200], [str(c) for c in choices], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{key}={shorten(value)} is not one of {', '.join(map(str, choices))}.{hint}"


# ---------------------------------------------------------------- reading YAML, bounded
#: A recipe holds a few hundred values; YAML aliases (`*name`) can make one of 456 bytes hold
#: billions (nine lists, each aliasing the previous one nine times: 9^9).
MAX_VALUES = 100_000
MAX_DEPTH = 64


def check_size(data: Any, where: str) -> None:
    """Refuse parsed YAML that holds more than MAX_VALUES values once its aliases are expanded,
    or nests deeper than MAX_DEPTH, naming `where` (the file or override).

    yaml.safe_load shares an aliased node instead of copying it, so an alias bomb parses at once;
    OmegaConf then copies every alias (gigabytes, hours). This walk visits what the expansion
    would, stopping at the bound, so it costs at most MAX_VALUES steps whatever the input."""
    stack = [(data, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise RecipeError(f"{where} holds more than {MAX_VALUES} values once its YAML aliases "
                              f"(*name) are expanded; a recipe holds a few hundred. Write the "
                              f"values out instead of aliasing lists of aliases.")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where} nests values more than {MAX_DEPTH} levels deep; a recipe "
                              f"needs a few. Flatten it.")
        children = node.values() if isinstance(node, dict) else \
            node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


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
    except RecursionError:
        raise RecipeError(f"recipe '{path}' nests values deeper than the YAML parser can "
                          f"follow; a recipe needs a few levels.") from None
    check_size(data, f"recipe '{path}'")
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


# ---------------------------------------------------------------- merging layers
def _closest_key(cfg: DictConfig, full_key: str) -> str:
    parent_path, _, leaf = full_key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    except Exception:  # noqa: BLE001
        parent = None
    keys = list(parent.keys()) if isinstance(parent, DictConfig) else []
    close = difflib.get_close_matches(leaf[:200], [str(k) for k in keys], n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{parent_path + '.' if parent_path else ''}{close[0]}'?"
    return f" Valid keys here: {', '.join(map(str, keys))}." if keys else ""


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as exc:
        key = str(getattr(exc, "full_key", None) or "?")
        if isinstance(exc, ConfigKeyError) or "not in" in str(exc):
            raise RecipeError(f"{source}: unknown key {shorten(key)}."
                              f"{_closest_key(base, key)}") from None
        if key == "?" and _not_a_section(layer):  # e.g. train.trace=5
            raise RecipeError(_not_a_section(layer)) from None
        if key in CHOICES:  # a Literal field: say it as every choice error is said
            value = OmegaConf.select(OmegaConf.create(layer), key)
            raise RecipeError(_not_a_choice(key, value)) from None
        msg = shorten(str(exc).splitlines()[0], 200, quote=False)
        raise RecipeError(f"{source}: bad value for '{key}': {msg}") from None


def _split_override(item: str) -> tuple[str, str]:
    """(key, value text) at the first '=' not escaped by a backslash (OmegaConf's rule)."""
    i = 0
    while i < len(item):
        if item[i] == "\\" and item[i + 1:i + 2] in (".", "[", "]", "="):
            i += 2
        elif item[i] == "=":
            return item[:i], item[i + 1:]
        else:
            i += 1
    return item, ""


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """One command-line override: ``dotted.key=value`` (a YAML value) or ``~dotted.key``."""
    source = f"override {shorten(item)}"
    if item.startswith("~"):
        if "=" in item:
            raise RecipeError(f"{source}: ~dotted.key removes a key and takes no value; write "
                              f"it alone, or dotted.key=value to set one.")
        return remove_key(cfg, item[1:], source)
    if "=" not in item:
        raise RecipeError(f"{source} must look like dotted.key=value (e.g. optimizer.lr=0.1), "
                          f"or ~dotted.key to remove a key.")
    try:  # bounded before OmegaConf copies what the value's aliases point to
        check_size(yaml.safe_load(_split_override(item)[1]), source)
    except yaml.YAMLError:
        pass  # OmegaConf's parser below says what is wrong
    except RecursionError:
        raise RecipeError(f"{source} nests values deeper than the YAML parser can "
                          f"follow.") from None
    try:
        layer = OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{source} could not be parsed ({shorten(first, 200, quote=False)}); "
                          f"write it as dotted.key=value with a YAML value, quoted if it has "
                          f"spaces or brackets.") from None
    return _merge(cfg, layer, source)


def remove_key(cfg: DictConfig, key: str, source: str) -> DictConfig:
    """`~key`: take `key` out of the merged layers. A key of an open section (`algorithm.*`,
    `model.kwargs.*`) disappears; a schema key (or a whole section) goes back to its default,
    since a typed section cannot lose a field. A key that is not there is an error."""
    parent_path, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise RecipeError(f"{source}: there is no key {shorten(key)} to remove."
                          f"{_closest_key(cfg, key)}")
    missing = object()
    default = OmegaConf.select(OmegaConf.structured(Recipe), key, default=missing)
    if default is missing:
        del parent[leaf]
    else:
        parent[leaf] = OmegaConf.to_container(default) if OmegaConf.is_config(default) \
            else default
    return cfg


def load_recipe(path: Optional[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults < bases < recipe < overrides, validated. Returns a read-only config."""
    cfg: DictConfig = OmegaConf.structured(Recipe)
    if path is not None:
        for layer in _load_with_bases(Path(path)):
            cfg = _merge(cfg, layer, f"recipe '{path}'")
    for item in overrides:
        cfg = _apply_override(cfg, item)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Every value rule, once, on the merged recipe: OmegaConf builds the schema's dataclasses
    from it, whose ``__post_init__`` check their own fields (frzoo.rules) and, in
    :class:`Recipe`, the rules that tie sections together. Errors name the key, rule and fix."""
    try:
        OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        if exc.full_key == "model.name":
            raise RecipeError("model.name is required: a timm model name or a registered "
                              "architecture (list them with `frzoo models`).") from None
        raise RecipeError(f"{exc.full_key} has no value (??? in the recipe): set it.") from None
    except OmegaConfBaseException as exc:  # an interpolation ${...} that does not resolve
        first = shorten(str(exc).splitlines()[0], 200, quote=False)
        raise RecipeError(f"recipe key '{getattr(exc, 'full_key', '?')}': {first}") from None


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
           "check_size", "check_master_addr", "check_compile_backend", "remove_key",
           "DictConfig", "ListConfig"]
