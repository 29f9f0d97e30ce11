"""A sweep run on this machine: W&B's sweep engine proposes, each trial trains in this process."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import metrics
from ..errors import FrzooError
from ..locks import folder_lock
from ..logging import Logger, build_loggers, close_loggers, read_jsonl
from .leaderboard import Trial, ranked, write_leaderboard
from .spec import SweepSpec, import_sweeps, param_overrides, plain_value, validate_trial

MAX_CONSECUTIVE_FAILURES = 3
Echo = Callable[[str], None]


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
            self._add(metrics.values(record))

    def log(self, record: Dict[str, Any], step: int) -> None:
        if self._add(metrics.values(record)) and self.should_stop and not self.stop_requested \
                and self.should_stop(list(self.history)):
            self.stop_requested = True  # the trainer asks before each step (train's should_stop)

    def summary(self, values: Dict[str, Any]) -> None:
        self.final = dict(values)

    def _add(self, values: Dict[str, Any]) -> bool:
        self.last.update(values)
        if self.metric in values:
            self.history.append(values[self.metric])
            return True
        return False

    def summary_metrics(self) -> Dict[str, Any]:
        """As W&B's run summary: each metric's last value, then the trainer's summary."""
        return {**self.last, **self.final}


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
        self.trials = read_state(self.state_path, self.spec, self.dir)

    def _save_state(self) -> None:
        write_state(self.state_path, self.spec, self.trials)

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
                    params = propose(self.spec, self.trials)
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

    def _should_stop(self, trial: Trial, history: List[float]) -> bool:
        """Hyperband (W&B's `early_terminate`) against the trials before this one."""
        if "early_terminate" not in self.spec.config:
            return False
        sweeps = import_sweeps()
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

    def _run_trial(self, trial: Trial) -> str:
        """Train one trial in this process; its outcome ("finished", "stopped", "failed" or
        "interrupted") is recorded in `trial`.

        In-process, not a `frzoo run` subprocess: a subprocess pays ~8 s of imports (torch,
        timm, wandb) per trial, more than a small trial trains; the trainer keeps no global state
        between calls (it builds model, data and optimizers from the recipe each time), and each
        trial's W&B run is finished (`reinit="create_new"`, closed in `finally`) before the next
        starts. Ctrl-C reaches the trainer's own handler: the trial checkpoints and the sweep
        stops; running the command again resumes that trial from its checkpoint.
        """
        out_dir, resume = self._trial_folder(trial)
        try:
            cfg = trial_recipe(self.spec, trial, out_dir, self.wandb_mode)
        except FrzooError as exc:
            trial.state, trial.error = "failed", str(exc)
            self.echo(f"trial {trial.name} failed: {exc}")
            return "failed"
        watcher = TrialWatcher(out_dir, self.spec.metric,
                               lambda history: self._should_stop(trial, history))
        summary = self._train(trial, cfg, out_dir, resume, watcher)
        return "failed" if summary is None else self._outcome(trial, watcher, summary)

    def _trial_folder(self, trial: Trial) -> Tuple[Path, bool]:
        """The trial's run folder and whether it resumes from its checkpoint; said on screen."""
        from ..rundir import checkpoint_path  # noqa: PLC0415
        out_dir = self.dir / "trials" / trial.name
        resume = checkpoint_path(out_dir).exists()
        if not resume and out_dir.exists():
            shutil.rmtree(out_dir)  # killed before its first checkpoint: start it over, cleanly
        planned = self.planned_trials()
        position = f"{self.trials.index(trial) + 1}" + (f"/{planned}" if planned else "")
        self.echo(f"trial {trial.name} ({position}){' resumed' if resume else ''}: "
                  f"{' '.join(param_overrides(trial.params))}")
        return out_dir, resume

    def _train(self, trial: Trial, cfg: Any, out_dir: Path, resume: bool,
               watcher: TrialWatcher) -> Optional[Dict[str, Any]]:
        """The trainer's summary, or None when the trial failed (the error recorded in it)."""
        from ..run import train  # noqa: PLC0415

        def echo(msg: str) -> None:
            self.echo(f"trial {trial.name}: {msg}")

        trackers = build_loggers(cfg.logging, out_dir=out_dir, resume=resume, echo=echo)
        extra = self.extra_loggers(trial.name) if self.extra_loggers else []
        start = time.perf_counter()
        try:
            summary = train(cfg, out_dir, resume=resume, loggers=[*trackers, watcher, *extra],
                            should_stop=lambda: watcher.stop_requested)
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
            return None
        trial.seconds += time.perf_counter() - start
        return summary

    def _outcome(self, trial: Trial, watcher: TrialWatcher, summary: Dict[str, Any]) -> str:
        """Record a trained trial's history, summary and metric; finished, stopped early by
        the sweep, or interrupted by the user."""
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
        return ranked(self.trials, self.spec.goal)

    def write_leaderboard(self) -> Path:
        """leaderboard.md and leaderboard.csv, sorted by the sweep's metric."""
        return write_leaderboard(self.dir, self.spec, self.trials)


def _sweep_lock(sweep_dir: Path) -> Any:
    """One process per local sweep: two would propose and train the same trials."""
    return folder_lock(sweep_dir, f"sweep folder '{sweep_dir}' is in use by another frzoo sweep "
                                  f"(pid {{pid}}); wait for it, or start this one with --name "
                                  f"NEW_NAME.")


def read_state(path: Path, spec: SweepSpec, sweep_dir: Path) -> List[Trial]:
    """The trials recorded in a sweep's state.json (none before the first); refused when the
    folder holds a sweep started with another sweep file or overrides."""
    if not path.is_file():
        return []
    state = json.loads(path.read_text())
    saved = state["sweep"]
    now = json.loads(json.dumps(spec.identity()))
    if saved != now:
        diff = [k for k in now if saved.get(k) != now[k]]
        raise FrzooError(
            f"'{sweep_dir}' holds sweep '{spec.name}' started with a different "
            f"{' and '.join(diff)}; continue it with the same sweep file and overrides, or "
            f"start a new one with --name NEW_NAME (or delete {sweep_dir}).")
    return [Trial(**t) for t in state["trials"]]


def write_state(path: Path, spec: SweepSpec, trials: List[Trial]) -> None:
    """state.json: the sweep's identity and every trial, replaced atomically."""
    state = {"version": 1, "sweep": spec.identity(), "trials": [asdict(t) for t in trials]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a kill mid-write never leaves half a state


def propose(spec: SweepSpec, trials: List[Trial]) -> Optional[Dict[str, Any]]:
    """The next trial's parameters from W&B's sweep engine, given the trials so far; None when
    a grid is exhausted."""
    sweeps = import_sweeps()
    runs = [t.sweep_run(spec.metric) for t in trials]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposal = sweeps.next_run(spec.config, runs, validate=True)
    if proposal is None:
        return None
    return {key: plain_value(value["value"]) for key, value in proposal.config.items()}


def trial_recipe(spec: SweepSpec, trial: Trial, out_dir: Path, wandb_mode: str) -> Any:
    """The recipe one trial trains: the sweep's recipe with the trial's parameters, its own run
    folder, and W&B names and tags that group it under the sweep."""
    from omegaconf import OmegaConf  # noqa: PLC0415
    cfg = validate_trial(spec, trial.params)
    tags = [*cfg.logging.tags, *(t for t in ("sweep", f"sweep:{spec.name}")
                                 if t not in cfg.logging.tags)]
    return OmegaConf.merge(cfg, {
        "run": {"out_dir": str(out_dir), "resume": None},
        "logging": {"wandb": wandb_mode != "disabled", "mode": wandb_mode,
                    "group": spec.name, "name": f"{spec.name}-{trial.name}", "tags": tags}})
