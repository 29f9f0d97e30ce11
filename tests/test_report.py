"""`frzoo report`: figures and markdown from real (tiny) runs; bad folders; skipped figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.report import build_report, label_runs, load_run
from frzoo.run import train
from frzoo.timeline import read_tracks

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=16", "data.num_test=8",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=2", "train.log_every=1", "train.progress=false"]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(out: Path, *extra: str) -> Path:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    fr = _run(root / "fr", "algorithm.name=fr", "train.sigma_every=1", "train.measure_memory=true",
              "train.trace={start: 1, steps: 2}")
    bp = _run(root / "bp", "algorithm.name=bp")  # no sigma, no memory, no trace
    return fr, bp


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_report_writes_figures_and_markdown(runs, tmp_path):
    fr, bp = runs
    report = build_report([fr, bp], tmp_path / "rep")
    assert set(report.figures) == {"curves_epoch", "curves_time", "sigma", "memory",
                                   "time_breakdown", "timeline"}
    for path in report.figures.values():
        assert _is_png(path), path
    md = report.markdown.read_text()
    assert report.markdown == tmp_path / "rep" / "report.md"
    for label in ("test_resnet fr K=3", "test_resnet bp K=3"):
        assert f"### {label}" in md
    for name in report.figures:
        assert f"]({name}.png)" in md
    # the bp run lacks sigma and memory: the figures show the fr run, the notes say why
    assert "test_resnet bp K=3: no sigma (run with train.sigma_every=N)" in md
    assert "test_resnet bp K=3: no memory (run with train.measure_memory=true)" in md
    assert "| 3 |" in md and "forward %" in md and "peak activations MiB" in md


def test_the_timeline_is_drawn_from_trace_json_with_a_row_per_part(runs, tmp_path):
    fr, bp = runs
    report = build_report([fr, bp], tmp_path / "rep")
    assert _is_png(report.figures["timeline"])
    md = report.markdown.read_text()
    assert "![Timeline of the traced steps (train.trace)](timeline.png)" in md
    assert "test_resnet bp K=3: no trace.json (run with train.trace={start: N, steps: M})" in md
    rows = [t.name for t in read_tracks(load_run(fr).trace)]  # what the figure's rows are
    assert rows == ["part 1 (cpu)", "part 2 (cpu)", "part 3 (cpu)"]
    # the run's section: per part, the share of the traced time per phase and idle
    assert "Timeline (trace.json, steps 1..2)" in md and "| optimizer % | idle % |" in md
    row = next(line for line in md.splitlines() if line.startswith("| part 3 (cpu) |"))
    assert sum(float(x) for x in row.split("|")[2:-1]) == pytest.approx(100, abs=0.5)
    assert build_report([bp], tmp_path / "none").skipped["timeline"].startswith("no timeline")


def test_wall_clock_is_the_records_training_seconds(runs):
    run = load_run(runs[0])
    times = [r["time/train_s"] for r in run.train]
    assert len(times) == 4 and times == sorted(times)
    total = json.loads((runs[0] / "summary.json").read_text())["train_seconds"]
    assert times[-1] == total  # measured, not derived
    # an evaluation is placed at the training seconds of its step
    by_step = {r["step"]: r["time/train_s"] for r in run.train}
    assert [r["time/train_s"] for r in run.evals] == [by_step[r["step"]] for r in run.evals]


def test_run_without_sigma_skips_the_figure_with_the_reason(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(runs[1]), "-o", str(out)]) == 0
    assert not (out / "sigma.png").exists() and not (out / "memory.png").exists()
    md = (out / "report.md").read_text()
    assert "skipped, no sigma: run with train.sigma_every" in md
    assert "skipped, no memory: run with train.measure_memory=true" in md
    assert _is_png(out / "time_breakdown.png") and _is_png(out / "curves_epoch.png")
    assert "skipped" in capsys.readouterr().out


def test_duplicate_labels_get_the_folder_name(runs):
    fr, bp = runs
    loaded = [load_run(p) for p in (fr, bp, bp)]
    label_runs(loaded)
    # unique: the plain label; same label and folder name twice: the path as given
    assert [r.label for r in loaded] == ["test_resnet fr K=3", f"test_resnet bp K=3 ({bp})",
                                         f"test_resnet bp K=3 ({bp})"]


def test_bad_run_dir_is_a_frzoo_error_naming_it(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FrzooError, match="not_a_run.*no metrics.jsonl"):
        build_report([runs[0], empty], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()  # nothing written before every folder is checked
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "r2")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
