"""Hyper-parameter sweeps: W&B's sweep YAML over dotted recipe keys, on a W&B server or locally.

A sweep file is W&B's own sweep config (``method``, ``metric``, ``parameters``, ``early_terminate``,
``run_cap``, ``name``) whose parameter names are dotted recipe keys (``optimizer.lr``,
``split.points``, ``algorithm.name``), plus two frzoo keys that W&B never sees:

* ``recipe``: the recipe the sweep varies (a path relative to the sweep file), and
* ``overrides``: ``dotted.key=value`` overrides applied to every trial before the parameters.

Two ways to run one, both validated the same way before any trial starts (every value of every
parameter is loaded into the recipe, so an unknown key or a bad value fails at once, naming it):

* with a W&B server, :func:`server_sweep_config` turns it into the config ``wandb.sweep`` takes, with
  a ``command`` that runs each trial as a plain ``frzoo run RECIPE ... key=value ...``;
* without one, :class:`LocalSweep` asks W&B's own sweep engine (the ``sweeps`` package: grid,
  random, bayes, hyperband early termination) for each next trial, trains it in this process
  (see :meth:`LocalSweep._run_trial` for why in-process), logs it as a W&B run grouped under the
  sweep (offline by default), and keeps its state in ``runs/sweeps/<name>/`` so that running the
  same command again continues where it stopped.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import yaml

from .errors import FrzooError
from .locks import folder_lock
from .loggers import Logger, build_loggers, close_loggers, read_jsonl
from .wandb_logger import check_metric_name, wandb_metrics

MAX_COMBINATIONS_CHECKED = 64  # every grid point is loaded up front below this many (~50 ms each)
MAX_CONSECUTIVE_FAILURES = 3
Echo = Callable[[str], None]


def _import_sweeps() -> Any:
    """W&B's sweep engine, lazily (only sweeps need it), quietly (it warns about pydantic)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sweeps  # noqa: PLC0415
    except ImportError as exc:
        raise FrzooError(f"sweeps need W&B's sweep engine: `pip install sweeps` ({exc}).") from None
    return sweeps


# ---------------------------------------------------------------- the sweep file
@dataclass
class SweepSpec:
    """A loaded, validated sweep file."""
    path: Path
    name: str
    recipe: Path
    overrides: List[str]
    config: Dict[str, Any]  # the W&B sweep config: method, metric, parameters, ...

    @property
    def metric(self) -> str:
        return str(self.config["metric"]["name"])

    @property
    def goal(self) -> str:
        return str(self.config["metric"].get("goal", "minimize"))

    @property
    def parameters(self) -> Dict[str, Dict[str, Any]]:
        return self.config["parameters"]

    def identity(self) -> Dict[str, Any]:
        """What must not change between two invocations that continue one local sweep."""
        return {"recipe": str(self.recipe), "overrides": list(self.overrides),
                "config": self.config}


def load_sweep(path: str | Path, extra_overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep file, check it against W&B's sweep schema and every value against the recipe.

    `extra_overrides` (from the command line) are appended to the file's `overrides`.
    """
    path = Path(path)
    if not path.is_file():
        raise FrzooError(f"sweep file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FrzooError(f"sweep file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise FrzooError(f"sweep file '{path}' must be a mapping (W&B's sweep YAML plus "
                         f"`recipe:`), not a {type(raw).__name__}.")
    config = dict(raw)
    recipe_value = config.pop("recipe", None)
    if not isinstance(recipe_value, str):
        raise FrzooError(f"sweep file '{path}' needs `recipe: PATH`, the recipe it sweeps over "
                         f"(relative to the sweep file), e.g. `recipe: ../quickstart.yaml`.")
    recipe = (path.parent / recipe_value).resolve()
    if not recipe.is_file():
        raise FrzooError(f"sweep file '{path}': recipe '{recipe_value}' does not exist (looked "
                         f"for {recipe}); give it relative to the sweep file.")
    overrides = config.pop("overrides", None) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise FrzooError(f"sweep file '{path}': `overrides` must be a list of 'dotted.key=value' "
                         f"strings, got {overrides!r}.")
    config.setdefault("name", path.stem)
    spec = SweepSpec(path=path, name=str(config["name"]), recipe=recipe,
                     overrides=[*overrides, *extra_overrides], config=config)
    _check_schema(spec)
    validate_parameters(spec)
    return spec


def _check_schema(spec: SweepSpec) -> None:
    sweeps = _import_sweeps()
    where = f"sweep file '{spec.path}'"
    params = spec.config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise FrzooError(f"{where} needs `parameters:`, a mapping of dotted recipe keys to "
                         f"W&B parameter specs, e.g. `optimizer.lr: {{values: [0.01, 0.1]}}`.")
    for key, param in params.items():
        if not isinstance(param, dict):
            raise FrzooError(f"{where}: parameter '{key}' must be a mapping such as "
                             f"{{values: [...]}}, {{value: ...}} or {{min: .., max: ..}}; got "
                             f"{param!r}.")
        if "parameters" in param:
            raise FrzooError(f"{where}: parameter '{key}' nests `parameters:`; write each "
                             f"recipe key dotted instead (e.g. '{key}.lr: {{values: [...]}}').")
    try:
        violations = sweeps.schema_violations_from_proposed_config(spec.config)
    except ValueError as exc:
        violations = [str(exc)]
    if violations:
        raise FrzooError(f"{where} does not follow W&B's sweep schema: " + "; ".join(violations)
                         + ". See https://docs.wandb.ai/guides/sweeps/sweep-config-keys "
                           "(frzoo adds only `recipe:` and `overrides:`).")
    metric = spec.config.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise FrzooError(f"{where} needs `metric: {{name: ..., goal: maximize|minimize}}`: the "
                         f"leaderboard, bayes and early termination rank trials by it (e.g. "
                         f"`metric: {{name: test/acc1, goal: maximize}}`).")
    problem = check_metric_name(str(metric["name"]))
    if problem:
        raise FrzooError(f"{where}: {problem} See docs/wandb.md for the names.")


def _plain(value: Any) -> Any:
    """numpy scalars (from the sweep engine) as Python values, so YAML/JSON/OmegaConf take them."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def override(key: str, value: Any) -> str:
    """`key=value` that frzoo's override parser reads back as exactly `value`.

    Non-strings are written as JSON (a YAML subset: lists, numbers, true/false, null); a string
    is written bare unless it would read back as something else (`"1e-3"`, `"true"`), then quoted.
    """
    from omegaconf import OmegaConf  # noqa: PLC0415
    value = _plain(value)
    if isinstance(value, str):
        plain = f"{key}={value}"
        try:
            if OmegaConf.select(OmegaConf.from_dotlist([plain]), key) == value:
                return plain
        except Exception:  # noqa: BLE001  unparsable bare: quote it
            pass
    return f"{key}={json.dumps(value)}"


def param_overrides(params: Dict[str, Any]) -> List[str]:
    return [override(key, value) for key, value in params.items()]


def candidate_values(key: str, param: Dict[str, Any]) -> List[Any]:
    """The values of one parameter to check up front: all listed values, or a distribution's ends
    and middle (W&B's own parameter class computes them, so log/q distributions come out right)."""
    if "values" in param:
        return [_plain(v) for v in param["values"]]
    if "value" in param:
        return [_plain(param["value"])]
    import numpy as np  # noqa: PLC0415
    _import_sweeps()
    from sweeps.params import HyperParameter  # noqa: PLC0415
    try:
        hp = HyperParameter(key, param)
        points = hp.ppf(np.array([0.0, 0.5, 1.0]))
    except Exception as exc:  # noqa: BLE001
        raise FrzooError(f"sweep parameter '{key}': {param!r} is not a valid W&B parameter spec "
                         f"({exc}).") from None
    out = []
    for v in np.atleast_1d(points).tolist():
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out.append(int(v) if param.get("distribution", "").startswith(("int", "q_")) and
                   float(v).is_integer() else v)
    return out


def validate_trial(spec: SweepSpec, params: Dict[str, Any],
                   models: Optional[Dict[str, Any]] = None) -> Any:
    """The trial's resolved recipe, or a FrzooError naming the bad key and the fix.

    With `models` (a cache, model config -> built model), the split is also resolved against the
    model, so a split point the model does not have fails here rather than in its trial.
    """
    from .config import load_recipe  # noqa: PLC0415
    cfg = load_recipe(spec.recipe, [*spec.overrides, *param_overrides(params)])
    _check_build_rules(cfg)
    if models is not None:
        _check_split(cfg, models)
    return cfg


def _check_build_rules(cfg: Any) -> None:
    """Rules load_recipe leaves to build time that a sweep should catch before its first trial."""
    from .build import num_parts_requested, resolve_algorithm  # noqa: PLC0415
    resolve_algorithm(cfg)  # an unknown name or an option the algorithm does not take
    k = num_parts_requested(cfg)
    if cfg.devices is not None and k is not None and len(cfg.devices) != k:
        raise FrzooError(f"devices lists {len(cfg.devices)} devices but the split gives {k} "
                         f"parts; sweeping K needs `devices=null` (every part on cpu) in the "
                         f"sweep's overrides, or one device per part.")


def _check_split(cfg: Any, models: Dict[str, Any]) -> None:
    """Resolve the split on the model (built once per model config; no data, no devices)."""
    from types import SimpleNamespace  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415
    from .build import build_model, build_partition  # noqa: PLC0415
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    if key not in models:
        # Module names do not depend on the class count or input channels: any will do here.
        info = SimpleNamespace(num_classes=cfg.data.num_classes, channels=cfg.data.channels)
        models[key] = build_model(cfg.model, info, cfg.train.seed)  # type: ignore[arg-type]
    build_partition(models[key], cfg)


def validate_parameters(spec: SweepSpec) -> None:
    """Load every value of every parameter into the recipe (and every grid point, when few)."""
    where = f"sweep file '{spec.path}'"
    models: Dict[str, Any] = {}
    try:
        validate_trial(spec, {}, models)
    except FrzooError as exc:
        raise FrzooError(f"{where}: the recipe with the sweep's overrides is invalid: {exc}") from None
    values = {key: candidate_values(key, param) for key, param in spec.parameters.items()}
    for key, vals in values.items():
        for value in vals:
            try:
                validate_trial(spec, {key: value}, models)
            except FrzooError as exc:
                kind = "is not a recipe key" if "unknown key" in str(exc) else \
                    f"value {json.dumps(value)} is rejected"
                raise FrzooError(f"{where}: parameter '{key}' {kind}: {exc}") from None
    if len(values) > 1 and math.prod(len(v) for v in values.values()) <= MAX_COMBINATIONS_CHECKED:
        for combo in itertools.product(*values.values()):
            params = dict(zip(values, combo))
            try:
                validate_trial(spec, params, models)
            except FrzooError as exc:
                raise FrzooError(f"{where}: the combination {json.dumps(params)} is invalid: "
                                 f"{exc}") from None


# ---------------------------------------------------------------- on a W&B server
def server_sweep_config(spec: SweepSpec, *, cwd: Optional[Path] = None) -> Dict[str, Any]:
    """The config `wandb.sweep` gets: the sweep file's W&B keys plus the command each trial runs.

    The command is `python -m frzoo.cli run RECIPE OVERRIDES... logging.wandb=true
    logging.mode=online key=value...`: the agent appends each parameter as `key=value` (W&B's
    `${args_no_hyphens}`), which is exactly frzoo's override syntax. The recipe path is relative
    to `cwd` when inside it, so agents run from the same folder on another machine find it.
    """
    cwd = (cwd or Path.cwd()).resolve()
    try:
        recipe = str(spec.recipe.relative_to(cwd))
    except ValueError:
        recipe = str(spec.recipe)
    config = copy.deepcopy(spec.config)
    config["program"] = "frzoo.cli"  # W&B wants one; the command runs it as a module
    config["command"] = ["${env}", "${interpreter}", "-m", "frzoo.cli", "run", recipe,
                         *spec.overrides, "logging.wandb=true", "logging.mode=online",
                         "${args_no_hyphens}"]
    _check_agent_formatting(spec)
    violations = _import_sweeps().schema_violations_from_proposed_config(config)
    if violations:  # pragma: no cover - load_sweep checked the same keys
        raise FrzooError(f"the W&B sweep config frzoo generated is invalid: {'; '.join(violations)}")
    return config


def _check_agent_formatting(spec: SweepSpec) -> None:
    """A W&B agent passes `key=str(value)`; refuse values that do not survive that (None)."""
    from omegaconf import OmegaConf  # noqa: PLC0415
    for key, param in spec.parameters.items():
        for value in param.get("values", [param["value"]] if "value" in param else []):
            as_agent = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]))
            as_frzoo = OmegaConf.to_container(OmegaConf.from_dotlist([override(key, value)]))
            if as_agent != as_frzoo:
                raise FrzooError(
                    f"sweep file '{spec.path}': parameter '{key}' value {value!r} would reach "
                    f"`frzoo run` from a W&B agent as '{key}={value}', which reads back as "
                    f"{OmegaConf.select(OmegaConf.create(as_agent), key)!r}. Leave that value out "
                    f"of a server sweep, or run the sweep with --local.")


# ---------------------------------------------------------------- local sweeps
@dataclass
class Trial:
    """One trial of a local sweep, as persisted in state.json."""
    name: str
    params: Dict[str, Any]
    state: str = "running"  # running (or interrupted) | finished | stopped (early) | failed
    metric: Optional[float] = None
    history: List[float] = field(default_factory=list)  # the sweep metric, each time logged
    summary: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0

    def sweep_run(self, metric: str) -> Any:
        """This trial as the sweep engine sees a W&B run."""
        sweeps = _import_sweeps()
        state = {"running": "running", "failed": "failed"}.get(self.state, "finished")
        return sweeps.SweepRun(name=self.name, state=state,
                               config={k: {"value": v} for k, v in self.params.items()},
                               summary_metrics=dict(self.summary),
                               history=[{metric: v} for v in self.history],
                               stopped=self.state == "stopped")


class TrialWatcher(Logger):
    """Follows one trial's records: the sweep metric's history, the summary, early termination.

    On resume it starts from the trial's metrics.jsonl (already cut back to the checkpoint by the
    trainer), so a resumed trial's history has no gap and no repeat.
    """

    def __init__(self, out_dir: Path, metric: str,
                 should_stop: Optional[Callable[[List[float]], bool]] = None) -> None:
        self.out_dir = out_dir
        self.metric = metric
        self.should_stop = should_stop
        self.last: Dict[str, Any] = {}
        self.history: List[float] = []
        self.final: Dict[str, Any] = {}
        self.stop_requested = False

    def start(self, config: Dict[str, Any]) -> None:
        path = self.out_dir / "metrics.jsonl"
        for record in read_jsonl(path) if path.is_file() else []:
            self._add(wandb_metrics(record))

    def log(self, record: Dict[str, Any], step: int) -> None:
        if self._add(wandb_metrics(record)) and self.should_stop and not self.stop_requested \
                and self.should_stop(list(self.history)):
            self.request_stop()

    def summary(self, values: Dict[str, Any]) -> None:
        self.final = dict(values)

    def _add(self, metrics: Dict[str, Any]) -> bool:
        self.last.update(metrics)
        if self.metric in metrics:
            self.history.append(metrics[self.metric])
            return True
        return False

    def summary_metrics(self) -> Dict[str, Any]:
        """As W&B's run summary: each metric's last value, then the trainer's summary."""
        return {**self.last, **self.final}

    def request_stop(self) -> None:
        """Stop the trial the way Ctrl-C does: the trainer finishes the step and checkpoints."""
        self.stop_requested = True
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            signal.raise_signal(signal.SIGINT)


@dataclass
class LocalSweepResult:
    sweep_dir: Path
    trials: List[Trial]
    interrupted: bool
    leaderboard: Path


class LocalSweep:
    """Runs a sweep on this machine with W&B's sweep engine; state in `root/<name>/`.

    Layout: `state.json` (the sweep's identity and every trial: parameters, state, metric),
    `trials/<tNNN>/` (each trial's run folder: recipe, metrics.jsonl, checkpoints, W&B run),
    `leaderboard.md` and `leaderboard.csv` (rewritten after every trial).
    """

    def __init__(self, spec: SweepSpec, *, root: Path = Path("runs/sweeps"),
                 wandb_mode: str = "offline", echo: Optional[Echo] = None,
                 extra_loggers: Optional[Callable[[str], List[Logger]]] = None) -> None:
        self.spec = spec
        self.dir = Path(root) / spec.name
        self.wandb_mode = wandb_mode
        self.echo: Echo = echo or print
        self.extra_loggers = extra_loggers  # per trial name, e.g. a test's interrupter
        self.trials: List[Trial] = []

    # -- state
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def _load_state(self) -> None:
        if not self.state_path.is_file():
            self.trials = []
            return
        state = json.loads(self.state_path.read_text())
        saved = state["sweep"]
        now = json.loads(json.dumps(self.spec.identity()))
        if saved != now:
            diff = [k for k in now if saved.get(k) != now[k]]
            raise FrzooError(
                f"'{self.dir}' holds sweep '{self.spec.name}' started with a different "
                f"{' and '.join(diff)}; continue it with the same sweep file and overrides, or "
                f"start a new one with --name NEW_NAME (or delete {self.dir}).")
        self.trials = [Trial(**t) for t in state["trials"]]

    def _save_state(self) -> None:
        state = {"version": 1, "sweep": self.spec.identity(),
                 "trials": [asdict(t) for t in self.trials]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
        os.replace(tmp, self.state_path)  # a kill mid-write never leaves half a state

    # -- the loop
    def run(self, count: Optional[int] = None) -> LocalSweepResult:
        """Run trials until the grid is exhausted, `run_cap` is reached or `count` trials ran."""
        run_cap = self.spec.config.get("run_cap")
        method = self.spec.config["method"]
        self.dir.mkdir(parents=True, exist_ok=True)
        with _sweep_lock(self.dir):
            self._load_state()
            if method != "grid" and run_cap is None and count is None:
                raise FrzooError(f"a {method} sweep never runs out of trials: set `run_cap: N` in "
                                 f"'{self.spec.path}' or pass --count N.")
            finished = sum(t.state != "running" for t in self.trials)
            if self.trials:
                self.echo(f"continuing sweep '{self.spec.name}' in {self.dir}: {finished} trials "
                          f"done, {len(self.trials) - finished} to continue")
            queue = [t for t in self.trials if t.state == "running"]
            ran = failures = 0
            interrupted = False
            while count is None or ran < count:
                if queue:
                    trial = queue.pop(0)
                else:
                    if run_cap is not None and len(self.trials) >= run_cap:
                        break
                    params = self._propose()
                    if params is None:
                        break  # the grid is exhausted
                    trial = Trial(name=f"t{len(self.trials) + 1:03d}", params=params)
                    self.trials.append(trial)
                    self._save_state()  # before training: an interruption leaves a record
                outcome = self._run_trial(trial)
                ran += 1
                self._save_state()
                self.write_leaderboard()
                if outcome == "interrupted":
                    interrupted = True
                    break
                failures = failures + 1 if trial.state == "failed" else 0
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self.echo(f"{failures} trials failed in a row; stopping the sweep. Fix the "
                              f"cause (see the errors above), then run the same command again.")
                    break
            board = self.write_leaderboard()
        return LocalSweepResult(self.dir, list(self.trials), interrupted, board)

    def planned_trials(self) -> Optional[int]:
        """How many trials the sweep will have: run_cap, or the grid's size; None if unbounded."""
        cap = self.spec.config.get("run_cap")
        grid: Optional[int] = None
        if self.spec.config["method"] == "grid" and all(
                "values" in p or "value" in p for p in self.spec.parameters.values()):
            grid = math.prod(len(p.get("values", [None])) for p in self.spec.parameters.values())
        if cap is not None and grid is not None:
            return min(cap, grid)
        return cap if cap is not None else grid

    def _propose(self) -> Optional[Dict[str, Any]]:
        sweeps = _import_sweeps()
        runs = [t.sweep_run(self.spec.metric) for t in self.trials]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proposal = sweeps.next_run(self.spec.config, runs, validate=True)
        if proposal is None:
            return None
        return {key: _plain(value["value"]) for key, value in proposal.config.items()}

    def _should_stop(self, trial: Trial, history: List[float]) -> bool:
        """Hyperband (W&B's `early_terminate`) against the trials before this one."""
        if "early_terminate" not in self.spec.config:
            return False
        sweeps = _import_sweeps()
        current = Trial(name=trial.name, params=trial.params, state="running", history=history)
        runs = [t.sweep_run(self.spec.metric) for t in self.trials
                if t.name != trial.name and t.state in ("finished", "stopped")]
        runs.append(current.sweep_run(self.spec.metric))
        stop = sweeps.stop_runs(self.spec.config, runs)
        if any(run.name == trial.name for run in stop):
            kind = self.spec.config["early_terminate"].get("type")
            self.echo(f"trial {trial.name}: early termination ({kind}) after {len(history)} "
                      f"values of {self.spec.metric}")
            return True
        return False

    def _trial_recipe(self, trial: Trial, out_dir: Path) -> Any:
        from omegaconf import OmegaConf  # noqa: PLC0415
        cfg = validate_trial(self.spec, trial.params)
        tags = [*cfg.logging.tags, *(t for t in ("sweep", f"sweep:{self.spec.name}")
                                     if t not in cfg.logging.tags)]
        return OmegaConf.merge(cfg, {
            "run": {"out_dir": str(out_dir), "resume": None},
            "logging": {"wandb": self.wandb_mode != "disabled", "mode": self.wandb_mode,
                        "group": self.spec.name, "name": f"{self.spec.name}-{trial.name}",
                        "tags": tags}})

    def _run_trial(self, trial: Trial) -> str:
        """Train one trial in this process.

        In-process, not a `frzoo run` subprocess: a subprocess pays ~8 s of imports (torch,
        timm, wandb) per trial, more than a small trial trains; the trainer keeps no global state
        between calls (it builds model, data and optimizers from the recipe each time), and each
        trial's W&B run is finished (`reinit="create_new"`, closed in `finally`) before the next
        starts. Ctrl-C reaches the trainer's own handler: the trial checkpoints and the sweep
        stops; running the command again resumes that trial from its checkpoint.
        """
        from .rundir import checkpoint_path  # noqa: PLC0415
        from .run import train  # noqa: PLC0415
        out_dir = self.dir / "trials" / trial.name
        resume = checkpoint_path(out_dir).exists()
        if not resume and out_dir.exists():
            shutil.rmtree(out_dir)  # killed before its first checkpoint: start it over, cleanly
        planned = self.planned_trials()
        position = f"{self.trials.index(trial) + 1}" + (f"/{planned}" if planned else "")
        self.echo(f"trial {trial.name} ({position}){' resumed' if resume else ''}: "
                  f"{' '.join(param_overrides(trial.params))}")
        try:
            cfg = self._trial_recipe(trial, out_dir)
        except FrzooError as exc:
            trial.state, trial.error = "failed", str(exc)
            self.echo(f"trial {trial.name} failed: {exc}")
            return "failed"
        trackers = build_loggers(cfg.logging, out_dir=out_dir, resume=resume,
                                 echo=lambda msg: self.echo(f"trial {trial.name}: {msg}"))
        watcher = TrialWatcher(out_dir, self.spec.metric,
                               lambda history: self._should_stop(trial, history))
        extra = self.extra_loggers(trial.name) if self.extra_loggers else []
        start = time.perf_counter()
        try:
            summary = train(cfg, out_dir, resume=resume, loggers=[*trackers, watcher, *extra],
                            echo=lambda msg: self.echo(f"trial {trial.name}: {msg}"))
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step, but a record
            close_loggers(trackers, failed=True)
            trial.seconds += time.perf_counter() - start
            self._save_state()
            raise
        except Exception as exc:  # noqa: BLE001  one bad trial does not end the sweep
            close_loggers(trackers, failed=True)
            trial.state = "failed"
            trial.error = f"{type(exc).__name__}: {exc}"
            trial.seconds += time.perf_counter() - start
            detail = "" if isinstance(exc, FrzooError) else "\n" + traceback.format_exc()
            self.echo(f"trial {trial.name} failed: {trial.error}{detail}")
            return "failed"
        trial.seconds += time.perf_counter() - start
        trial.history = list(watcher.history)
        trial.summary = watcher.summary_metrics()
        value = trial.summary.get(self.spec.metric)
        trial.metric = float(value) if isinstance(value, (int, float)) else None
        if summary.get("interrupted") and not watcher.stop_requested:
            self.echo(f"sweep interrupted during trial {trial.name} (checkpoint saved); run the "
                      f"same command again to continue it.")
            return "interrupted"
        # A stop requested at the last evaluation ends nothing early: the trial finished.
        trial.state = "stopped" if watcher.stop_requested and summary.get("interrupted") \
            else "finished"
        shown = f"{trial.metric:.4g}" if trial.metric is not None else "n/a"
        self.echo(f"trial {trial.name} {trial.state}: {self.spec.metric}={shown} "
                  f"({trial.seconds:.1f} s)")
        return trial.state

    # -- results
    def ranked(self) -> List[Trial]:
        """Trials with a metric, best first (by the sweep's goal), then the rest by name."""
        scored = [t for t in self.trials if t.metric is not None and t.state != "running"]
        sign = -1.0 if self.spec.goal == "maximize" else 1.0
        scored.sort(key=lambda t: (sign * t.metric, t.name))  # type: ignore[operator]
        rest = sorted((t for t in self.trials if t not in scored), key=lambda t: t.name)
        return scored + rest

    def write_leaderboard(self) -> Path:
        """leaderboard.md and leaderboard.csv, sorted by the sweep's metric."""
        metric = self.spec.metric
        params = list(self.spec.parameters)
        extra = [k for k in ("best_test_acc1", "final_test_acc1", "steps", "train_seconds")
                 if k != metric]
        header = ["rank", "trial", "state", metric, *params, *extra, "run_dir"]
        rows = []
        for rank, trial in enumerate(self.ranked(), 1):
            rows.append([rank if trial.metric is not None else "", trial.name, trial.state,
                         trial.metric, *(trial.params.get(p) for p in params),
                         *(trial.summary.get(k) for k in extra),
                         str(Path("trials") / trial.name)])
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else v
                             for v in row])
        (self.dir / "leaderboard.csv").write_text(buf.getvalue())

        def cell(v: Any) -> str:
            if v is None:
                return ""
            if isinstance(v, float):
                return f"{v:.4g}"
            if isinstance(v, list):
                return json.dumps(v).replace("|", "\\|")
            return str(v).replace("|", "\\|")
        goal = "higher" if self.spec.goal == "maximize" else "lower"
        lines = [f"# Sweep `{self.spec.name}`",
                 "",
                 f"Recipe `{self.spec.recipe}`, method {self.spec.config['method']}, sorted by "
                 f"`{metric}` ({goal} is better). {len(self.trials)} trials: "
                 + ", ".join(f"{n} {s}" for s, n in _counts(t.state for t in self.trials)) + ".",
                 "",
                 "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        failed = [t for t in self.trials if t.state == "failed"]
        if failed:
            lines += ["", "Failed trials:", ""]
            lines += [f"- {t.name}: {(t.error or '').splitlines()[0] if t.error else ''}"
                      for t in failed]
        path = self.dir / "leaderboard.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _counts(states: Iterator[str]) -> List[tuple]:
    out: Dict[str, int] = {}
    for s in states:
        out[s] = out.get(s, 0) + 1
    return sorted(out.items())


def _sweep_lock(sweep_dir: Path) -> Any:
    """One process per local sweep: two would propose and train the same trials."""
    return folder_lock(sweep_dir, f"sweep folder '{sweep_dir}' is in use by another frzoo sweep "
                                  f"(pid {{pid}}); wait for it, or start this one with --name "
                                  f"NEW_NAME.")
__all__ = ["SweepSpec", "load_sweep", "validate_parameters", "server_sweep_config", "LocalSweep",
           "LocalSweepResult", "Trial", "TrialWatcher", "override", "param_overrides"]
