"""Reliability: whole-job kills and resumption, Ctrl-C and SIGTERM (once: a checkpoint; twice: at
once), a stalled worker, full disks, two runs on one folder. What each test proves is listed in
docs/reliability.md.

Kills are made deterministic with a fault plugin (a `.py` file listed in the recipe's
`plugins:`, as any user plugin): driven by FRZOO_FAULT=<where>:<n>, it writes a marker file and
then sleeps at the n-th training step / evaluation / checkpoint write of the process, where the
test SIGKILLs the job. At a checkpoint write it sleeps after writing half of the process's
entries, so the kill really leaves a half-written save behind. Without FRZOO_FAULT the plugin does nothing, which is
how the resumed runs use it. No test hook lives in frzoo itself.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from frzoo import rundir
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.run import train

# 6 steps per epoch, 18 steps; checkpoints at steps 4, 6, 8, 12, 16 and 18; evaluations at 6, 12, 18.
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=48", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "split.points=[layer2,layer4]",
        "train.epochs=3", "train.progress=false", "train.threads=1", "train.log_every=2",
        "train.checkpoint_every=4", "optimizer.lr=0.05", "distributed.timeout_s=30"]

FAULT_PLUGIN = '''
"""Test fault injection: pause (for a kill) at a chosen point, set by FRZOO_FAULT."""
import dataclasses, os, time
from pathlib import Path
from torch.distributed.checkpoint import FileSystemWriter
import frzoo.executors.base as base
from frzoo.algorithms.fr import FeaturesReplay

WHERE, _, N = os.environ.get("FRZOO_FAULT", "").partition(":")
MARK = Path(os.environ.get("FRZOO_FAULT_MARK", "/nonexistent"))
SLOW = float(os.environ.get("FRZOO_FAULT_SLOW", "0"))
seen = {"step": 0, "eval": 0, "checkpoint": 0}


def pause(where):
    seen[where] += 1
    if WHERE == where and seen[where] == int(N):
        MARK.write_text(f"{where} {os.getpid()}")
        time.sleep(600)


_backward = FeaturesReplay.backward
def backward(self, delta, step):
    if self.index == 1:  # the middle part, after the last part already updated: mid-step
        pause("step")
        if SLOW and WHERE == "mark" and seen["step"] >= int(N):
            MARK.write_text("mark")
            time.sleep(SLOW)
    return _backward(self, delta, step)
FeaturesReplay.backward = backward

_add = base.EvalTotals.add
def add(self, logits, target):
    if not getattr(self, "_counted", False):
        self._counted = True
        pause("eval")
    return _add(self, logits, target)
base.EvalTotals.add = add

_write_data = FileSystemWriter.write_data
def write_data(self, plan, planner):
    seen["checkpoint"] += 1
    if WHERE == "checkpoint" and seen["checkpoint"] == int(N):
        _write_data(self, dataclasses.replace(plan, items=plan.items[: len(plan.items) // 2]),
                    planner).wait()
        MARK.write_text(f"checkpoint {os.getpid()}")
        time.sleep(600)
    return _write_data(self, plan, planner)
FileSystemWriter.write_data = write_data
'''


def fault_plugin(tmp_path: Path) -> str:
    path = tmp_path / "fault.py"
    path.write_text(FAULT_PLUGIN)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Dict[str, torch.Tensor]:
    """The final weights of an uninterrupted in-process run, one thread per part as in the
    distributed runs (so they equal it too); built once for the tests of this file."""
    out = tmp_path_factory.mktemp("straight") / "r"
    train(load_recipe(None, [*TINY, f"run.out_dir={out}"]), out)
    return torch.load(out / "final.pt", weights_only=True)


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def start(args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "frzoo.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def descendants(pid: int) -> List[int]:
    out: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out += [child, *descendants(child)]
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name}: {proc.stderr.read()}")
        assert time.time() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.05)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the whole job at once: the launcher and every worker."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def killed_at(where: str, args: List[str], tmp_path: Path) -> None:
    mark = tmp_path / f"mark-{where}"
    mark.unlink(missing_ok=True)
    proc = start(args, {"FRZOO_FAULT": where, "FRZOO_FAULT_MARK": str(mark)})
    wait_for(mark, proc)
    kill_job(proc)


def checkpoint_step(out: Path) -> int:
    return rundir.saved_step(rundir.checkpoint_path(out))


def finish(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frzoo.cli", "run", "--resume", str(out)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_local_job_killed_in_a_step_an_evaluation_and_a_checkpoint_write_resumes_exactly(
        tmp_path, reference):
    out = tmp_path / "r"
    first = [*TINY, f"plugins=[{fault_plugin(tmp_path)}]", f"run.out_dir={out}"]
    killed_at("step:7", first, tmp_path)  # in step 7 (index 6): part 3 updated, parts 1-2 not
    assert checkpoint_step(out) == 6
    killed_at("eval:1", ["--resume", str(out)], tmp_path)  # the evaluation after step 12
    assert checkpoint_step(out) == 12
    # This start evaluates the epoch-2 evaluation it missed and checkpoints (step 12) again,
    # then writes at 16; the third write is the one at step 18.
    killed_at("checkpoint:3", ["--resume", str(out)], tmp_path)
    assert checkpoint_step(out) == 16  # the half-written save never replaced the last one
    assert list((out / "checkpoints").glob(".save-*.tmp"))  # ... and it was half written
    done = finish(out)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"never completed \(the run stopped while writing it\); resuming from "
                     rf"the last complete one, {out}/checkpoints/step-00000016-\d+ \(step 16\)",
                     done.stderr), done.stderr
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the debris is removed on resume
    assert_same(reference, torch.load(out / "final.pt", weights_only=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(2, 19, 2))  # every window once, none repeated
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12, 18]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_checkpoint_and_says_how_to_resume(tmp_path, reference):
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    proc = start([*TINY, f"plugins=[{fault_plugin(tmp_path)}]", f"run.out_dir={out}"],
                 {"FRZOO_FAULT": "mark:3", "FRZOO_FAULT_MARK": str(mark), "FRZOO_FAULT_SLOW": "0.3"})
    wait_for(mark, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    step = checkpoint_step(out)
    assert 3 <= step < 18
    assert f"interrupted at step {step}; checkpoint saved. Resume with `frzoo run --resume {out}`" in stderr
    assert "Traceback" not in stderr and not (out / ".lock").exists()
    done = finish(out)
    assert done.returncode == 0, done.stderr
    assert_same(reference, torch.load(out / "final.pt", weights_only=True))


@pytest.mark.slow
def test_distributed_job_ctrl_c_then_killed_in_a_checkpoint_write_resumes_exactly(
        tmp_path, reference):  # one thread per process: the distributed run equals it
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    proc = start([*TINY, "executor=distributed", f"plugins=[{fault_plugin(tmp_path)}]",
                  f"run.out_dir={out}"],
                 {"FRZOO_FAULT": "mark:3", "FRZOO_FAULT_MARK": str(mark), "FRZOO_FAULT_SLOW": "0.3"})
    wait_for(mark, proc)
    proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches the launcher only
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    step = checkpoint_step(out)
    assert f"interrupted at step {step}; checkpoint saved. Resume with `frzoo run --resume {out}`" in stderr
    killed_at("checkpoint:2", ["--resume", str(out)], tmp_path)  # the leader, mid-write
    assert checkpoint_step(out) > step
    time.sleep(1.0)  # the orphaned workers notice their launcher is gone (every 0.5 s)
    done = finish(out)
    assert done.returncode == 0, done.stderr
    assert_same(reference, torch.load(out / "final.pt", weights_only=True))


# ---------------------------------------------------------------- SIGTERM (preemption)
def stopped_at(stderr: str, out: Path) -> int:
    """The step the stop line names; the checkpoint must hold exactly that step."""
    lines = [line for line in stderr.splitlines() if "interrupted at step" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert f"interrupted at step {step}; checkpoint saved. Resume with " \
           f"`frzoo run --resume {out}`" in lines[0]
    assert checkpoint_step(out) == step
    return step


def signal_job(proc: subprocess.Popen, everyone: bool) -> None:
    """SIGTERM as Kubernetes sends it (the main process) or as systemd and Slurm do (every
    process of the job at once)."""
    for pid in [proc.pid, *(descendants(proc.pid) if everyone else [])]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("executor, everyone", [("local", False), ("distributed", True)])
def test_sigterm_stops_with_a_checkpoint_of_the_stop_step_and_resumes_exactly(
        tmp_path, executor, everyone, reference):
    """Preemption: SIGTERM is Ctrl-C. The local run stops after the step in progress; the
    distributed job, signalled in every process, stops once (the launcher relays it to part 1,
    the workers ignore their own copy) at the next run of steps. Both checkpoint the step they
    stop at, say how to resume, exit 130, and the resumed run equals an uninterrupted one."""
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    proc = start([*TINY, f"executor={executor}", f"plugins=[{fault_plugin(tmp_path)}]",
                  f"run.out_dir={out}"],
                 {"FRZOO_FAULT": "mark:3", "FRZOO_FAULT_MARK": str(mark), "FRZOO_FAULT_SLOW": "0.3"})
    wait_for(mark, proc)
    signal_job(proc, everyone)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert 3 <= stopped_at(stderr, out) < 18
    assert not (out / ".lock").exists() and not descendants(proc.pid)
    done = finish(out)
    assert done.returncode == 0, done.stderr
    assert_same(reference, torch.load(out / "final.pt", weights_only=True))


def test_sigterm_to_torchrun_stops_the_job_with_a_checkpoint_and_it_resumes_exactly(
        tmp_path, reference):
    """torchrun's agent, sent SIGTERM, sends it once to each worker (and SIGKILL after its
    --shutdown-timeout): part 1 stops the job at the next run of steps with a checkpoint of
    that step, the others ignore theirs."""
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    env = {**os.environ, "FRZOO_FAULT": "mark:3", "FRZOO_FAULT_MARK": str(mark),
           "FRZOO_FAULT_SLOW": "0.3", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
         "--monitor-interval", "0.2", "-m", "frzoo.cli", "run", *TINY,
         f"plugins=[{fault_plugin(tmp_path)}]", f"run.out_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(mark, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    ours = "\n".join(line for line in stderr.splitlines() if line.startswith("frzoo:"))
    assert 3 <= stopped_at(ours, out) < 18, stderr
    assert "lost a neighbour" not in stderr and not descendants(proc.pid)
    done = finish(out)
    assert done.returncode == 0, done.stderr
    assert_same(reference, torch.load(out / "final.pt", weights_only=True))


@pytest.mark.parametrize("executor", ["local", "distributed"])
def test_a_second_signal_stops_at_once_with_one_line_naming_the_last_checkpoint(tmp_path, executor):
    """Ctrl-C, then SIGTERM while the step in progress hangs (the middle part pauses in step 7,
    after the checkpoint of step 6): the second signal ends the job at once, exit 130, with one
    line naming the checkpoint that survives; no traceback, no process left."""
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    proc = start([*TINY, f"executor={executor}", f"plugins=[{fault_plugin(tmp_path)}]",
                  f"run.out_dir={out}"], {"FRZOO_FAULT": "step:7", "FRZOO_FAULT_MARK": str(mark)})
    wait_for(mark, proc)
    deadline = time.time() + 60
    while checkpoint_step(out) != 6:  # distributed: the leader may still be writing it
        assert time.time() < deadline
        time.sleep(0.1)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first signal waits for the step, which hangs
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if "stopped" in line or "interrupted" in line]
    assert lines == [f"frzoo: stopped at once by a second SIGTERM; the steps since the last "
                     f"checkpoint are lost. The last good checkpoint is {rundir.checkpoint_path(out)} "
                     f"(step 6); resume with `frzoo run --resume {out}`."], stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    time.sleep(1.0)  # a worker notices within 0.5 s that its launcher is gone
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]]
    assert checkpoint_step(out) == 6


STALL_PLUGIN = '''
import time
from frzoo.plugins import register_algorithm
from frzoo.algorithms.fr import FeaturesReplay

@register_algorithm("fr_stalls")
class Stalls(FeaturesReplay):
    def backward(self, delta, step):
        if step == 5 and self.index == 1:
            time.sleep(10**6)  # stuck, not dead
        return super().backward(delta, step)
'''


@pytest.mark.slow
def test_a_stalled_worker_is_named_and_the_job_stops_within_the_timeout(tmp_path):
    plugin = tmp_path / "stall.py"
    plugin.write_text(STALL_PLUGIN)
    out = tmp_path / "r"
    cfg = load_recipe(None, [*TINY, "executor=distributed", "distributed.timeout_s=5",
                             f"plugins=[{plugin}]", "algorithm.name=fr_stalls",
                             f"run.out_dir={out}"])
    started = time.time()
    with pytest.raises(FrzooError) as info:
        train(cfg, out)
    message = str(info.value)
    assert "part 2 (rank 1) stalled" in message and "distributed.timeout_s" in message, message
    assert "\n" not in message
    assert time.time() - started < 90  # start-up (~20 s on 2 busy cores) + 5 s + the shutdown
    assert not multiprocessing.active_children()
    assert checkpoint_step(out) == 4  # the last complete checkpoint is kept


def test_two_runs_on_one_folder_the_second_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "r"
    mark = tmp_path / "mark"
    proc = start([*TINY, f"plugins=[{fault_plugin(tmp_path)}]", f"run.out_dir={out}"],
                 {"FRZOO_FAULT": "step:2", "FRZOO_FAULT_MARK": str(mark)})
    try:
        wait_for(mark, proc)  # the first run holds the folder, paused in its second step
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        for executor in ("local", "distributed"):
            cfg = load_recipe(None, [*TINY, f"executor={executor}", f"run.out_dir={out}"])
            with pytest.raises(FrzooError, match=rf"in use by another frzoo run \(pid {proc.pid}\)"):
                train(cfg, out)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
        assert not multiprocessing.active_children()
    finally:
        kill_job(proc)
    # SIGKILL leaves the lock file; the kernel dropped the lock itself, so the folder is free
    summary = train(load_recipe(None, [*TINY, "train.max_steps=2", f"run.out_dir={out}"]), out)
    assert summary["steps"] == 2


# ---------------------------------------------------------------- full disks, unwritable folders
def test_an_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is expected")
    for out in (blocker / "run", Path("/proc/frzoo-run")):
        cfg = load_recipe(None, [*TINY, f"run.out_dir={out}"])
        with pytest.raises(FrzooError, match=rf"run.out_dir '{out}' is not writable.*another folder"):
            train(cfg, out)


def test_a_file_size_limit_fails_at_the_first_checkpoint_with_one_line(tmp_path):
    import resource
    out = tmp_path / "r"
    limit = 200_000  # recipe, metrics and partition fit; a 3 MB checkpoint does not
    proc = subprocess.run(
        [sys.executable, "-m", "frzoo.cli", "run", *TINY, f"run.out_dir={out}"],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"could not write checkpoint '{out}/checkpoints/.save-000001.tmp' (File too large)" \
        in errors[0]
    assert not rundir.checkpoint_path(out).exists()
    assert not list((out / "checkpoints").glob(".*tmp*"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs: room for one 3 MB checkpoint but not for a second next to it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the file size limit "
                    f"test covers the failing write")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_at_the_failing_write_and_keeps_the_last_checkpoint(small_tmpfs):
    out = small_tmpfs / "r"
    cfg = load_recipe(None, [*TINY, f"run.out_dir={out}"])
    with pytest.raises(FrzooError) as info:
        train(cfg, out)
    message = str(info.value)
    assert f"could not write checkpoint '{out}/checkpoints/.save-000002.tmp' (No space left on " \
        f"device)" in message
    assert f"the previous checkpoint {rundir.checkpoint_path(out)} is kept" in message
    assert "\n" not in message
    assert checkpoint_step(out) == 4  # the first checkpoint, complete
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert not (out / ".lock").exists()
