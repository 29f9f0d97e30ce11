"""A local sweep's trials as state.json keeps them, and the leaderboard that ranks them."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .spec import SweepSpec, import_sweeps


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
        sweeps = import_sweeps()
        state = {"running": "running", "failed": "failed"}.get(self.state, "finished")
        return sweeps.SweepRun(name=self.name, state=state,
                               config={k: {"value": v} for k, v in self.params.items()},
                               summary_metrics=dict(self.summary),
                               history=[{metric: v} for v in self.history],
                               stopped=self.state == "stopped")


def ranked(trials: Sequence[Trial], goal: str) -> List[Trial]:
    """Trials with a metric, best first (by the sweep's goal), then the rest by name."""
    scored = [t for t in trials if t.metric is not None and t.state != "running"]
    sign = -1.0 if goal == "maximize" else 1.0
    scored.sort(key=lambda t: (sign * t.metric, t.name))  # type: ignore[operator]
    rest = sorted((t for t in trials if t not in scored), key=lambda t: t.name)
    return scored + rest


def write_leaderboard(sweep_dir: Path, spec: SweepSpec, trials: Sequence[Trial]) -> Path:
    """leaderboard.md and leaderboard.csv in `sweep_dir`, sorted by the sweep's metric."""
    metric = spec.metric
    params = list(spec.parameters)
    extra = [k for k in ("best_test_acc1", "final_test_acc1", "steps", "train_seconds")
             if k != metric]
    header = ["rank", "trial", "state", metric, *params, *extra, "run_dir"]
    rows = []
    for rank, trial in enumerate(ranked(trials, spec.goal), 1):
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
    (sweep_dir / "leaderboard.csv").write_text(buf.getvalue())

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return json.dumps(v).replace("|", "\\|")
        return str(v).replace("|", "\\|")
    goal = "higher" if spec.goal == "maximize" else "lower"
    lines = [f"# Sweep `{spec.name}`",
             "",
             f"Recipe `{spec.recipe}`, method {spec.config['method']}, sorted by "
             f"`{metric}` ({goal} is better). {len(trials)} trials: "
             + ", ".join(f"{n} {s}" for s, n in _counts(t.state for t in trials)) + ".",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    failed = [t for t in trials if t.state == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- {t.name}: {(t.error or '').splitlines()[0] if t.error else ''}"
                  for t in failed]
    path = sweep_dir / "leaderboard.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _counts(states: Iterator[str]) -> List[tuple]:
    out: Dict[str, int] = {}
    for s in states:
        out[s] = out.get(s, 0) + 1
    return sorted(out.items())
