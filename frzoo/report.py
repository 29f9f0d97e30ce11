"""`frzoo report`: figures and a markdown summary comparing finished runs (the paper's study).

Reads only a run folder's own files (metrics.jsonl, summary.json, recipe.yaml, partition.json),
so a report can be made on any machine, long after training. Figures:

- ``curves_epoch.png`` / ``curves_time.png``: train loss, test loss, train accuracy and test
  top-1 against epoch and against training wall-clock (``time/train_s``; the paper's Fig. 4);
- ``sigma.png``: sigma per part over training, a heatmap per run (Fig. 3);
- ``memory.png``: parameters, optimizer state and peak activations per part and run (Fig. 5);
- ``time_breakdown.png``: each part's step time split into forward, replay, backward,
  optimizer, wait and other;
- ``timeline.png``: the traced steps of runs with ``train.trace`` (trace.json): a row per part
  (and replica), time across, a colour per phase; the gaps are idle time (bubbles).

A figure no run has data for is skipped, and report.md says why. matplotlib is imported only
here, with the Agg backend (no display needed).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import metrics, rundir, timeline
from .errors import FrzooError

MEMORY_KINDS = (("params_bytes", "parameters"), ("optimizer_bytes", "optimizer state"),
                ("peak_activation_bytes", "peak activations"))
SIGMA_BINS = 20  # columns of the sigma heatmap, at most
MIB = metrics.MIB


@dataclass
class Run:
    path: Path
    train: List[Dict[str, Any]]
    evals: List[Dict[str, Any]]
    summary: Optional[Dict[str, Any]] = None
    recipe: Optional[Dict[str, Any]] = None
    num_parts: int = 0
    label: str = ""
    notes: List[str] = field(default_factory=list)
    trace: Optional[Dict[str, Any]] = None  # trace.json (train.trace), when the run wrote one

    @property
    def model(self) -> str:
        return str((self.summary or {}).get("model")
                   or _get(self.recipe, "model", "name") or "?")

    @property
    def algorithm(self) -> str:
        return str((self.summary or {}).get("algorithm")
                   or _get(self.recipe, "algorithm", "name") or "?")

    def sigma_records(self) -> List[Dict[str, Any]]:
        return [r for r in self.train if any(metrics.part(k, metrics.SIGMA) in r
                                             for k in range(1, self.num_parts + 1))]

    def memory(self) -> List[Dict[str, int]]:
        rows = (self.summary or {}).get("part_memory_bytes") or []
        return rows if any(rows) else []

    def time_shares(self) -> List[Dict[str, float]]:
        return (self.summary or {}).get("part_time_share") or []


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    figures: Dict[str, Path]
    skipped: Dict[str, str]  # figure name -> why it was not drawn


def _get(tree: Optional[Dict[str, Any]], *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _num(value: Any) -> float:
    """A metrics value as a float; JSON holds nan/inf as strings ("nan")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_json(path: Path, run_dir: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FrzooError(f"run folder '{run_dir}': {path.name} cannot be read ({exc})") from None


def load_run(path: str | Path) -> Run:
    """A run folder's records. The one hard requirement is metrics.jsonl."""
    from .logging import read_jsonl
    run_dir = Path(path)
    jsonl = run_dir / "metrics.jsonl"
    if not jsonl.is_file():
        what = "does not exist" if not run_dir.exists() else (
            "is not a folder" if not run_dir.is_dir() else "has no metrics.jsonl")
        raise FrzooError(f"'{run_dir}' {what}: not a frzoo run folder. Pass folders that "
                         f"`frzoo run` wrote (run.out_dir).")
    try:
        records = read_jsonl(jsonl)
    except (OSError, ValueError) as exc:
        raise FrzooError(f"run folder '{run_dir}': metrics.jsonl cannot be read ({exc})") from None
    summary = _read_json(run_dir / "summary.json", run_dir)
    recipe = None
    if (run_dir / "recipe.yaml").is_file():
        import yaml
        try:
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FrzooError(f"run folder '{run_dir}': recipe.yaml cannot be read "
                             f"({exc})") from None
    run = Run(path=run_dir, summary=summary if isinstance(summary, dict) else None,
              recipe=recipe if isinstance(recipe, dict) else None,
              train=sorted((r for r in records if r.get(metrics.KIND) == metrics.TRAIN),
                           key=lambda r: r.get("step", 0)),
              evals=sorted((r for r in records if r.get(metrics.KIND) == metrics.EVAL),
                           key=lambda r: r.get("step", 0)))
    partition = _read_json(run_dir / "partition.json", run_dir)
    trace = _read_json(rundir.trace_path(run_dir), run_dir)
    run.trace = trace if isinstance(trace, dict) else None
    first = run.train[0] if run.train else {}  # has partK/lr for every part K
    run.num_parts = int((run.summary or {}).get("num_parts")
                        or (len(partition) if isinstance(partition, list) else 0)
                        or next(k for k in itertools.count()
                                if metrics.part(k + 1, "lr") not in first))
    if run.summary is None:
        run.notes.append("no summary.json (the run is still going or was killed): no time shares or memory")
    return run


def label_runs(runs: Sequence[Run]) -> None:
    """`<model> <algorithm> K=<k>`; runs sharing a label get their folder name added (and the
    whole path as given when folder names are the same too)."""
    base = [f"{r.model} {r.algorithm} K={r.num_parts}" for r in runs]
    for run, label in zip(runs, base):
        if base.count(label) == 1:
            run.label = label
            continue
        same = [r for r, b in zip(runs, base) if b == label]
        names = [r.path.name for r in same]
        tag = run.path.name if names.count(run.path.name) == 1 else str(run.path)
        run.label = f"{label} ({tag})"


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _colors(n: int) -> List[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_curves(runs: Sequence[Run], path: Path, *, x: str) -> None:
    """Train/test loss and accuracy per run against `x` = "epoch" or "time" (each record's
    training seconds so far, `time/train_s`)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [(axes[0][0], "train", metrics.TRAIN_LOSS, "train loss"),
              (axes[0][1], "eval", metrics.TEST_LOSS, "test loss"),
              (axes[1][0], "train", metrics.TRAIN_ACC, "train accuracy (%)"),
              (axes[1][1], "eval", metrics.TEST_ACC1, "test top-1 accuracy (%)")]
    x_key = metrics.EPOCH if x == "epoch" else metrics.TRAIN_S
    for run, color in zip(runs, _colors(len(runs))):
        for ax, kind, key, _ in panels:
            records = run.train if kind == "train" else run.evals
            if not records:
                continue
            xs = [_num(r.get(x_key)) for r in records]
            ys = [_num(r.get(key)) for r in records]
            ax.plot(xs, ys, color=color, label=run.label,
                    marker="o" if kind == "eval" else None, markersize=3, linewidth=1.4)
    for ax, _, _, title in panels:
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch" if x == "epoch" else "training wall-clock (s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3) or 1, fontsize=9,
               frameon=False)
    fig.suptitle("Loss and accuracy against " + ("epoch" if x == "epoch" else "wall-clock time"))
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sigma_grid(run: Run, bins: int = SIGMA_BINS) -> Tuple[Any, float]:
    """(parts x bins array of mean sigma, NaN where none; the run's last epoch). Bins split the
    training progress (epoch 0 .. the last record's epoch) evenly."""
    import numpy as np
    records = run.sigma_records()
    end = max((_num(r.get(metrics.EPOCH)) for r in run.train), default=0.0)
    end = end if end > 0 else 1.0
    n = max(1, min(bins, len(records)))
    sums, counts = np.zeros((run.num_parts, n)), np.zeros((run.num_parts, n))
    for record in records:
        progress = _num(record.get(metrics.EPOCH)) / end
        col = min(n - 1, max(0, int(math.ceil(progress * n)) - 1)) if progress == progress else 0
        for k in range(run.num_parts):
            value = _num(record.get(metrics.part(k + 1, metrics.SIGMA)))
            if math.isfinite(value):
                sums[k, col] += value
                counts[k, col] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), end


def plot_sigma(runs: Sequence[Run], path: Path) -> None:
    import numpy as np
    plt = _plt()
    grids = [(run, *sigma_grid(run)) for run in runs]
    values = np.concatenate([g[np.isfinite(g)] for _, g, _ in grids])
    vmin, vmax = min(0.0, float(values.min())), max(1.0, float(values.max()))
    fig, axes = plt.subplots(len(grids), 1, squeeze=False,
                             figsize=(9, 1.2 + sum(0.45 * g.shape[0] + 0.8 for _, g, _ in grids)),
                             gridspec_kw={"height_ratios": [g.shape[0] + 1.5 for _, g, _ in grids]})
    image = None
    for ax, (run, grid, end) in zip(axes[:, 0], grids):
        masked = np.ma.masked_invalid(grid)
        image = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          interpolation="nearest", extent=(0, end, grid.shape[0] + 0.5, 0.5))
        ax.set_facecolor("#dddddd")  # no sigma in that bin (e.g. the pipeline was filling)
        ax.set_yticks(range(1, grid.shape[0] + 1))
        ax.set_yticklabels([f"part {k}" for k in range(1, grid.shape[0] + 1)], fontsize=8)
        ax.set_title(run.label, fontsize=10)
        if grid.shape[0] * grid.shape[1] <= 120:
            for k in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[k, j]):
                        x = (j + 0.5) * end / grid.shape[1]
                        shade = (grid[k, j] - vmin) / max(vmax - vmin, 1e-12)
                        ax.text(x, k + 1, f"{grid[k, j]:.2f}", ha="center", va="center",
                                fontsize=7, color="black" if shade > 0.6 else "white")
    axes[-1, 0].set_xlabel("epoch (training progress; each column is one bin)")
    fig.suptitle("sigma per part over training (1 = the backprop gradient's direction)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.91, 0.12, 0.02, 0.74))
    fig.colorbar(image, cax=cax, label="sigma")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(runs: Sequence[Run], path: Path) -> None:
    """Grouped bars: x = part, one bar per run, stacked parameters/optimizer/activations."""
    import numpy as np
    plt = _plt()
    parts = max(len(run.memory()) for run in runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * parts * max(1, len(runs) / 2)), 4.8))
    hatches = ("", "//", "..")
    for i, (run, color) in enumerate(zip(runs, _colors(len(runs)))):
        rows = run.memory()
        xs = np.arange(1, len(rows) + 1) - 0.4 + width * (i + 0.5)
        bottom = np.zeros(len(rows))
        for (key, _), hatch in zip(MEMORY_KINDS, hatches):
            heights = np.array([row.get(key, 0) / MIB for row in rows])
            ax.bar(xs, heights, width * 0.92, bottom=bottom, color=color, hatch=hatch,
                   edgecolor="white", linewidth=0.6)
            bottom += heights
        for x, total in zip(xs, bottom):
            ax.text(x, total, f"{total:.3g}", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch
    handles = [Patch(color=c, label=r.label) for r, c in zip(runs, _colors(len(runs)))]
    handles += [Patch(facecolor="#999999", hatch=h, edgecolor="white", label=name)
                for (_, name), h in zip(MEMORY_KINDS, hatches)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(1, parts + 1))
    ax.set_xticklabels([f"part {k}" for k in range(1, parts + 1)])
    ax.set_ylabel("MiB (peak over the run)")
    ax.set_title("Memory per part: parameters, optimizer state, peak activations")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_breakdown(runs: Sequence[Run], path: Path) -> None:
    """A panel per run: x = part, stacked shares of the part's step time per phase."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), squeeze=False, sharey=True,
                             figsize=(max(6.0, 2.2 + 2.6 * len(runs)), 4.4))
    colors = dict(zip(metrics.BREAKDOWN, plt.get_cmap("Set2").colors))
    colors["other"] = "#d9d9d9"  # the rest of the step: transfers, Python, probes
    for ax, run in zip(axes[0], runs):
        shares = run.time_shares()
        bottom = [0.0] * len(shares)
        for phase in metrics.BREAKDOWN:
            heights = [100 * _num(row.get(phase, 0.0)) for row in shares]
            heights = [h if math.isfinite(h) else 0.0 for h in heights]
            ax.bar(range(1, len(shares) + 1), heights, 0.7, bottom=bottom, color=colors[phase],
                   label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(1, len(shares) + 1))
        ax.set_xticklabels([f"part {k}" for k in range(1, len(shares) + 1)], fontsize=8)
        ax.set_title(run.label, fontsize=9)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("% of the part's step time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("Per-part time breakdown")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(runs: Sequence[Run], path: Path) -> None:
    """A panel per run with a trace: a row per part (and replica), time across in ms from the
    window's first span, a colour per phase; what no span covers (white) is idle."""
    plt = _plt()
    tracks = [timeline.read_tracks(run.trace or {}) for run in runs]
    names = timeline.phase_names([t for rows in tracks for t in rows])
    palette = _plt().get_cmap("tab20").colors  # one colour per phase, the same in every report
    known = {name: palette[2 * i % 20] for i, name in enumerate(timeline.PHASE_ORDER)}
    extra = [n for n in names if n not in known]
    colors = {**known, **{n: palette[(2 * i + 1) % 20] for i, n in enumerate(extra)}}
    fig, axes = plt.subplots(len(runs), 1, squeeze=False, sharex=True, figsize=(
        11, 1.0 + sum(0.5 * max(len(rows), 1) + 0.7 for rows in tracks)),
        gridspec_kw={"height_ratios": [max(len(rows), 1) + 1 for rows in tracks]})
    for ax, run, rows in zip(axes[:, 0], runs, tracks):
        for y, track in enumerate(rows):
            for name in names:
                bars = [(b / 1000, (e - b) / 1000) for n, b, e in track.spans if n == name]
                ax.broken_barh(bars, (y - 0.38, 0.76), color=colors[name], linewidth=0)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([t.name for t in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # part 1 on top
        steps = ((run.trace or {}).get("otherData", {}).get("frzoo", {}).get("steps") or [])
        window = f", steps {steps[0]}..{steps[1] - 1}" if len(steps) == 2 else ""
        ax.set_title(f"{run.label}{window}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms from the window's first span (white: idle)")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=colors[n], label=n) for n in names], loc="upper center",
               ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {
    "curves_epoch": "Loss and accuracy against epoch (paper Fig. 4)",
    "curves_time": "Loss and accuracy against training wall-clock (paper Fig. 4)",
    "sigma": "sigma per part over training (paper Fig. 3)",
    "memory": "Memory per part and algorithm (paper Fig. 5)",
    "time_breakdown": "Per-part time breakdown",
    "timeline": "Timeline of the traced steps (train.trace)",
}


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Report:
    """Write the figures and report.md comparing `run_dirs` into `out_dir`."""
    if not run_dirs:
        raise FrzooError("frzoo report needs at least one run folder")
    runs = [load_run(d) for d in run_dirs]  # all checked before anything is written
    label_runs(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FrzooError(f"report folder '{out}' cannot be created ({exc.strerror})") from None
    figures: Dict[str, Path] = {}
    skipped: Dict[str, str] = {}
    notes: List[str] = []

    def draw(name: str, fn: Any, *args: Any, **kw: Any) -> None:
        path = out / f"{name}.png"
        fn(*args, path, **kw)
        figures[name] = path

    if any(r.train or r.evals for r in runs):
        draw("curves_epoch", plot_curves, runs, x="epoch")
        draw("curves_time", plot_curves, runs, x="time")
    else:
        skipped["curves_epoch"] = skipped["curves_time"] = \
            "no curves: no run has train or eval records in metrics.jsonl"
    # (figure, which runs have its data, how to draw it, note for a run without, reason to skip)
    optional = [
        ("sigma", lambda r: r.sigma_records(), plot_sigma,
         "no sigma (run with train.sigma_every=N)",
         "no sigma: run with train.sigma_every=N (records partK/sigma)"),
        ("memory", lambda r: r.memory(), plot_memory,
         "no memory (run with train.measure_memory=true)",
         "no memory: run with train.measure_memory=true (summary.json part_memory_bytes)"),
        ("time_breakdown", lambda r: r.time_shares(), plot_time_breakdown,
         "no part_time_share (no summary.json)",
         "no time breakdown: no run has summary.json part_time_share (runs that finished or "
         "were interrupted write it)"),
        ("timeline", lambda r: timeline.read_tracks(r.trace or {}), plot_timeline,
         "no trace.json (run with train.trace={start: N, steps: M})",
         "no timeline: no run has trace.json (run with train.trace={start: N, steps: M})"),
    ]
    for name, has_data, plot, note, reason in optional:
        with_data = [r for r in runs if has_data(r)]
        if not with_data:
            skipped[name] = reason
            continue
        notes += [f"{run.label}: {note}" for run in runs if run not in with_data]
        draw(name, plot, with_data)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(runs, figures, skipped, notes))
    return Report(out_dir=out, markdown=markdown, figures=figures, skipped=skipped)


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    number = _num(value)
    return "—" if value is None or not math.isfinite(number) else f"{number:{spec}}{suffix}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(runs: Sequence[Run], figures: Dict[str, Path], skipped: Dict[str, str],
                    notes: Sequence[str]) -> str:
    """report.md: the runs side by side, the figures (or why each is missing), then each run."""
    lines = ["# frzoo report", "",
             f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs) + ".", ""]
    lines += _overview_table(runs)
    lines += ["", "## Figures", ""] + _figure_section(figures, skipped, notes)
    lines += ["## Runs", ""]
    for run in runs:
        lines += _run_section(run)
    return "\n".join(lines).rstrip() + "\n"


def _executor(run: Run) -> Any:
    return (run.summary or {}).get("executor") or _get(run.recipe, "executor") or "—"


def _overview_table(runs: Sequence[Run]) -> List[str]:
    """One row per run: what it was and what it reached."""
    lines = ["| run | model | algorithm | K | executor | steps | best acc1 | final acc1 | img/s "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary or {}
        lines.append("| " + " | ".join(_cell(v) for v in (
            run.label, run.model, run.algorithm, run.num_parts, _executor(run),
            s.get("steps", "—"),
            _fmt(s.get("best_test_acc1"), suffix="%"), _fmt(s.get("final_test_acc1"), suffix="%"),
            _fmt(s.get("images_per_s"), ".1f"), _fmt(s.get("train_seconds"), ".1f"))) + " |")
    return lines


def _figure_section(figures: Dict[str, Path], skipped: Dict[str, str],
                    notes: Sequence[str]) -> List[str]:
    """Each figure drawn, or the reason it was skipped; then the notes about missing data."""
    lines: List[str] = []
    for name, title in FIGURES.items():
        if name in figures:
            lines += [f"### {title}", "", f"![{title}]({figures[name].name})", ""]
        elif name in skipped:
            lines += [f"- {title}: skipped, {skipped[name]}."]
    if any(name in skipped for name in FIGURES):
        lines.append("")
    if "curves_time" in figures:
        lines += ["Wall-clock is training time only (no evaluation): each record's "
                  f"`{metrics.TRAIN_S}`, which ends at summary.json's train_seconds.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def _run_section(run: Run) -> List[str]:
    """One run: its facts, the per-part time and memory table, its notes."""
    s = run.summary or {}
    lines = [f"### {run.label}", "", f"Folder `{run.path}`.", "", "| | |", "|---|---|"]
    for key, value in (("model", run.model), ("algorithm", run.algorithm),
                       ("K (parts)", run.num_parts),
                       ("executor", _executor(run)),
                       ("steps", s.get("steps", "—")),
                       ("epochs", _fmt(s.get("epochs"), "g")),
                       ("best test acc1", _fmt(s.get("best_test_acc1"), suffix="%")),
                       ("final test acc1", _fmt(s.get("final_test_acc1"), suffix="%")),
                       ("final test acc5", _fmt(s.get("final_test_acc5"), suffix="%")),
                       ("images/s", _fmt(s.get("images_per_s"), ".1f")),
                       ("train seconds", _fmt(s.get("train_seconds"), ".1f")),
                       ("interrupted", s.get("interrupted", "—"))):
        lines.append(f"| {key} | {_cell(value)} |")
    lines.append("")
    lines += _parts_table(run)
    lines += _timeline_table(run)
    lines += [f"- {note}" for note in run.notes] + ([""] if run.notes else [])
    return lines


def _timeline_table(run: Run) -> List[str]:
    """Per track of the run's trace: the share of the traced time in each phase, and idle."""
    tracks = timeline.read_tracks(run.trace or {})
    if not tracks:
        return []
    names = [*timeline.phase_names(tracks), "idle"]
    steps = (run.trace or {}).get("otherData", {}).get("frzoo", {}).get("steps") or ["?", "?"]
    lines = [f"Timeline (trace.json, steps {steps[0]}..{_num(steps[1]) - 1:g}): the share of "
             f"the traced time per part.", "", "| part | " + " | ".join(f"{n} %" for n in names)
             + " |", "|" + "---|" * (len(names) + 1)]
    for track, row in zip(tracks, timeline.shares(tracks)):
        lines.append(f"| {_cell(track.name)} | "
                     + " | ".join(_fmt(100 * row.get(n, 0.0), ".1f") for n in names) + " |")
    return lines + [""]


def _parts_table(run: Run) -> List[str]:
    """Per part: the share of each kind of time and the bytes of each kind of memory."""
    shares, memory = run.time_shares(), run.memory()
    if not shares and not memory:
        return []
    header = ["part"] + ([f"{p} %" for p in metrics.BREAKDOWN] if shares else []) + \
             ([f"{name} MiB" for _, name in MEMORY_KINDS] if memory else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in range(max(len(shares), len(memory))):
        row = [f"{k + 1}"]
        if shares:
            share = shares[k] if k < len(shares) else {}
            row += [_fmt(100 * _num(share[p]), ".1f") if p in share else "—"
                    for p in metrics.BREAKDOWN]
        if memory:
            mem = memory[k] if k < len(memory) else {}
            row += [_fmt(mem[key] / MIB, ".3f") if key in mem else "—"
                    for key, _ in MEMORY_KINDS]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]
