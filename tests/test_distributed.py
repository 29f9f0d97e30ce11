"""One process per part on torch.distributed (gloo, CPU): exactness, failures, start-up errors.

Exactness compares with the single-process executor at one thread per process: the number of
intra-op threads changes how float reductions are split, so equal thread counts are part of the
reference, not a tolerance.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.executors import fork_server
from frzoo.executors.failures import Report, WorkerDied, blame, explain, shorten
from frzoo.executors.launch import launch, lost_neighbour
from frzoo.executors.part_state import read_checkpoint
from frzoo.executors.topology import Layout
from frzoo.executors.wire import PeerLost, PeerStalled
from frzoo.run import train
from support import launch_probe  # workers that write what they find when they start

TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=40", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "train.epochs=2", "train.progress=false",
        "train.threads=1", "train.log_every=3", "optimizer.lr=0.05", "distributed.timeout_s=20"]
SPLITS = {2: "split.points=[layer3]", 3: "split.points=[layer2,layer4]"}


def run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"])
    return train(cfg, out, resume=resume)


def same_weights(a: Path, b: Path) -> bool:
    x = torch.load(a / "final.pt", weights_only=True)
    y = torch.load(b / "final.pt", weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("algo,k", [("fr", 2), ("bp", 2), ("fr", 3), ("bp", 3)])
def test_distributed_equals_local_bit_for_bit(tmp_path, algo, k, monkeypatch):
    run(tmp_path / "local", SPLITS[k], f"algorithm.name={algo}")
    scratch = tmp_path / "tmp"  # the temporary folder the job is given: it leaves nothing there
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))  # what the workers would inherit
    summary = run(tmp_path / "dist", SPLITS[k], f"algorithm.name={algo}", "executor=distributed")
    assert list(scratch.iterdir()) == []  # the workers' wandb-media/-artifacts folders included
    assert same_weights(tmp_path / "local", tmp_path / "dist")
    # same outputs as a local run: checkpoint (with the delta in flight), metrics, summary
    a = read_checkpoint(tmp_path / "local")
    b = read_checkpoint(tmp_path / "dist")
    assert [len(m) for m in a["executor"]["mailboxes"]] == [len(m) for m in b["executor"]["mailboxes"]]
    for ma, mb in zip(a["executor"]["mailboxes"], b["executor"]["mailboxes"]):
        assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert summary["final_test_acc1"] == run_summary(tmp_path / "local")["final_test_acc1"]
    assert len(summary["part_time_share"]) == k
    assert "wait" in summary["part_time_share"][0]
    assert not multiprocessing.active_children()


def run_summary(path: Path) -> dict:
    import json
    return json.loads((path / "summary.json").read_text())


def test_distributed_checkpoint_resumes_in_either_executor(tmp_path):
    """Also the distributed run's timeline (train.trace, which changes no result): one track
    per rank, on one clock, with the transport's spans."""
    from test_timeline import check_trace
    run(tmp_path / "straight", SPLITS[3], "train.max_steps=8")
    run(tmp_path / "r", SPLITS[3], "train.max_steps=4", "executor=distributed",
        "train.trace={start: 1, steps: 2}")
    doc = check_trace(tmp_path / "r" / "trace.json", {(1, 1), (1, 2), (1, 3)}, range(1, 3))
    names = {(e["tid"], e["name"]) for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {(1, "send"), (2, "wait"), (2, "send"), (3, "wait"), (3, "backward")} <= names
    run(tmp_path / "r", SPLITS[3], "train.max_steps=8", "executor=local", resume=True)
    assert same_weights(tmp_path / "straight", tmp_path / "r")


# One algorithm name per plugin file: the launching process imports the recipe's plugins too (it
# checks the algorithm's options before any worker starts), and the tests share one process.
FAILING_PLUGIN = '''
import os, signal
from frzoo.plugins import register_algorithm
from frzoo.algorithms.fr import FeaturesReplay

@register_algorithm("fr_{name}")
class Breaks(FeaturesReplay):
    def backward(self, delta, step):
        if step == 5 and self.index == {index}:
            {action}
        return super().backward(delta, step)
'''


def plugin(tmp_path: Path, index: int, action: str, name: str = "") -> str:
    """A plugin whose algorithm `fr_NAME` (default `fr_breaks_INDEX`) runs `action` in part
    INDEX + 1 at step 5."""
    name = name or f"breaks_{index}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(FAILING_PLUGIN.format(index=index, action=action, name=name)))
    return str(path)


def test_a_worker_that_raises_stops_the_job_and_names_part_rank_and_error(tmp_path):
    path = plugin(tmp_path, 1, 'raise ValueError("boom in the replay")')
    start = time.time()
    with pytest.raises(RuntimeError, match=r"part 2 \(rank 1.*ValueError: boom in the replay"):
        run(tmp_path / "r", SPLITS[3], f"plugins=[{path}]", "algorithm.name=fr_breaks_1",
            "executor=distributed", "train.checkpoint_every=2")
    assert time.time() - start < 60
    assert not multiprocessing.active_children()
    state = read_checkpoint(tmp_path / "r")
    assert state["progress"]["step"] == 5  # the last complete checkpoint (epoch end) survives


def test_a_killed_worker_stops_the_job_within_seconds(tmp_path):
    """The middle part of three is killed: both its neighbours lose their connection to it and
    fail at once, yet the report names the killed part, in one line."""
    path = plugin(tmp_path, 1, "os.kill(os.getpid(), signal.SIGKILL)", name="killed_1")
    start = time.time()
    with pytest.raises(RuntimeError, match=r"^part 2 \(rank 1\) was killed by signal SIGKILL") \
            as info:
        run(tmp_path / "r", SPLITS[3], f"plugins=[{path}]", "algorithm.name=fr_killed_1",
            "executor=distributed", "train.checkpoint_every=2")
    assert isinstance(info.value, FrzooError) and "\n" not in str(info.value)  # no traceback
    assert time.time() - start < 60
    assert not multiprocessing.active_children()
    assert read_checkpoint(tmp_path / "r")["progress"]["step"] == 5


def test_a_user_error_in_a_worker_is_reported_as_such(tmp_path):
    with pytest.raises(FrzooError, match=r"part 3 \(rank 2.*loss is (nan|inf) at step"):
        run(tmp_path / "r", SPLITS[3], "optimizer.lr=1e30", "executor=distributed")
    assert not multiprocessing.active_children()


def test_port_in_use_fails_fast(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(FrzooError, match=rf"master_port={port}.*cannot be used.*master_port=0"):
            run(tmp_path / "r", SPLITS[2], "executor=distributed", f"distributed.master_port={port}")


def test_missing_device_fails_before_starting_workers(tmp_path):
    with pytest.raises(FrzooError, match=r"'cuda:1' does not exist.*available here: cpu"):
        run(tmp_path / "r", SPLITS[2], "executor=distributed", "devices=[cpu,cuda:1]")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_torchrun_world_size_must_match_the_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(FrzooError, match=r"torchrun started 3 processes.*recipe has 2 parts"):
        run(tmp_path / "r", SPLITS[2], "executor=distributed")


# ---------------------------------------------------------------- how the workers start
def ignores_sigterm(pid: int) -> bool:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def gone(pid: int) -> bool:
    """Exited (a zombie whose parent has not reaped it yet counts as exited)."""
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    except OSError:
        return True


def probes(out: Path, world: int, proc: Optional[subprocess.Popen] = None) -> List[dict]:
    deadline = time.time() + 120
    paths = [out / f"probe-{rank}.json" for rank in range(world)]
    while not all(path.exists() for path in paths):
        assert proc is None or proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the workers did not start within 120 s"
        time.sleep(0.1)
    return [json.loads(path.read_text()) for path in paths]


def test_workers_fork_from_a_server_that_imported_once_and_never_initialised_cuda(
        tmp_path, monkeypatch):
    """Each worker is a fork of the fork server, which imported frzoo.run and timm before and
    never initialised CUDA (a fork after that could not use it); it runs with the launcher's
    environment as it is at launch, not as it was when the server started, with the job's
    scratch folder as its temporary folder, and watches the launcher, not its parent."""
    fork_server.context("frzoo.run")  # the server is running before the environment changes
    monkeypatch.setenv("FRZOO_PROBE", "set after the server started")
    cfg = load_recipe(None, [*TINY, SPLITS[2], "executor=distributed"])
    launch(cfg, tmp_path / "r", resume=False, num_parts=2, worker=launch_probe.report)
    seen = probes(tmp_path / "r", 2)
    server = seen[0]["parent"]
    for worker in seen:
        assert worker["preloaded"] == ["frzoo.run", "timm"] and not worker["cuda_initialized"]
        assert worker["probe"] == "set after the server started"
        assert Path(worker["tmp"]).name.startswith("frzoo-workers-")  # removed after the job
        assert worker["parent"] == server != os.getpid() == worker["launcher"]
    assert ignores_sigterm(server)  # Slurm signals every process: the server must stay


LAUNCHER = """
import multiprocessing.util, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from frzoo.config import load_recipe
from frzoo.executors import fork_server
from frzoo.executors.launch import launch
from support.launch_probe import report_and_wait
fork_server.context("frzoo.run")
Path({out!r}).with_name("socket-folder").write_text(multiprocessing.util.get_temp_dir())
launch(load_recipe(None, {args!r}), Path({out!r}), resume=False, num_parts=2,
       worker=report_and_wait)
"""


def test_a_killed_launcher_leaves_no_worker_no_fork_server_and_no_temporary_folder(tmp_path):
    """SIGKILL the launcher alone: its workers and its fork server exit within moments, and the
    server removes its temporary folder (W&B made two folders there when timm was imported),
    which sits in the launching process's temporary folder, not in a job's. That folder is too
    deep for a Unix socket, so the server's socket is in the system's."""
    home = tmp_path / ("deep-" * 12)
    home.mkdir()
    assert len(str(home)) + len("/pymp-12345678/listener-12345678") > fork_server.SOCKET_PATH_MAX
    out = tmp_path / "r"
    script = LAUNCHER.format(tests=str(Path(__file__).parent), out=str(out),
                             args=[*TINY, SPLITS[2], "executor=distributed"])
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = probes(out, 2, proc)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    socket_folder = Path((tmp_path / "socket-folder").read_text())
    shutil.rmtree(socket_folder)  # the launcher's own, left by the SIGKILL
    assert home not in socket_folder.parents
    server = seen[0]["parent"]
    made = list(home.glob("frzoo-fork-server-*/*wandb*"))
    assert len(made) == 2, made  # wandb-media, wandb-artifacts: the server's, in its own folder
    deadline = time.time() + 5
    while not all(gone(pid) for pid in [server, *(w["pid"] for w in seen)]):
        assert time.time() < deadline, "a worker or the fork server outlived its launcher"
        time.sleep(0.05)
    left = [p.name for p in home.iterdir()]  # the job's scratch folder: its launcher was killed
    assert len(left) == 1 and left[0].startswith("frzoo-workers-"), left


# ---------------------------------------------------------------- who is blamed for a failure
def test_blame_prefers_a_killed_rank_over_the_neighbours_that_lost_it():
    """Exit codes and reports as the launcher records them, whatever order they came in."""
    lost = lambda rank, peer: Report(rank, "h", True, f"lost part of rank {peer}", peer)
    # K=3, the middle rank SIGKILLed, both neighbours lost it (and exited 2)
    assert blame([2, -9, 2], [lost(0, 1), lost(2, 1)]) == ("died", 1)
    assert blame([None, -9, 2], [lost(2, 1)]) == ("died", 1)  # rank 0 not yet exited
    # R=2 x K=2, rank 2 killed: rank 3 lost it, rank 0 failed in the gradient sum with a raw
    # gloo error (no PeerFailure): still the killed rank
    raw = Report(0, "h", False, "RuntimeError: Connection reset by peer", None)
    assert blame([1, None, -9, 2], [raw, lost(3, 2)]) == ("died", 2)
    assert blame([0, 0, 1, 0], []) == ("died", 2)  # exited non-zero without a report
    assert blame([2, -9, -15], [lost(0, 1)]) == ("died", 1)  # the signal first, then the rank
    assert blame([2, -9, -15][::-1], [lost(2, 1)]) == ("died", 0)


def test_blame_an_own_error_then_a_stalled_rank():
    lost = lambda rank, peer: Report(rank, "h", True, "...", peer)
    bug = Report(1, "h", False, "ValueError: boom", None)
    user = Report(2, "h", True, "loss is nan", None)
    assert blame([2, 1, 2], [lost(0, 1), bug, lost(2, 1)]) == ("error", 1)
    assert blame([None, 1, 2], [bug, user]) == ("error", 2)  # the user error says it all
    assert blame([2, None], [lost(0, 1)], stuck=[1]) == ("stalled", 1)
    assert blame([2, 2, None], [lost(0, 1), lost(1, -1)], stuck=[2]) == ("stalled", 2)


def test_explain_names_part_and_replica_in_one_line():
    name = lambda rank: Layout(rank, 2, 2).name()
    error = explain([2, None, -9, 2], [Report(3, "h", True, "...", 2)], [], 20.0, name)
    assert isinstance(error, WorkerDied) and isinstance(error, RuntimeError)
    assert str(error).startswith("part 1 of replica 1 (rank 2) was killed by signal SIGKILL; ")
    assert "\n" not in str(error)
    stalled = explain([2, None], [Report(0, "h", True, "...", 1)], [1], 5.0,
                      lambda rank: Layout(rank, 2).name())
    assert str(stalled).startswith("part 2 (rank 1) stalled: part 1 waited more than 5 s")


def test_torchrun_lost_neighbour_names_part_and_replica_and_cuts_at_a_word(tmp_path):
    cause = PeerLost("part 2 of replica 1 (rank 3) lost part 1 of replica 1 (rank 2) while "
                     "waiting for a delta from it " + "word " * 60, 2)
    error = lost_neighbour(cause, Layout(3, 2, 2), tmp_path)
    text = str(error)
    assert isinstance(error, FrzooError)
    assert text.startswith("part 2 of replica 1 (rank 3, host ") and "lost a neighbour" in text
    assert "word ...)" in text and "\n" not in text
    assert lost_neighbour(ValueError("x"), Layout(0, 2), tmp_path).args == ("x",)
    assert shorten("abc defgh ijk", 8) == "abc ..." and shorten("a\nb") == "a"


FAILED_WAITS = """
import json, os, sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
from frzoo.executors.wire import Waiting, waited_for

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3,
                        timeout=timedelta(seconds=2))
dist.barrier()
if rank != 1:
    time.sleep(1 if rank == 2 else 5)  # rank 2 goes away after 1 s; rank 0 stays, silent
    os._exit(0)
found = []
for peer in (2, 0):  # lost, then stalled
    try:
        with Waiting("rank 1", f"rank {peer}", peer, "a message", 2.0):
            try:
                dist.irecv(torch.zeros(4), peer).wait()
            except BaseException as exc:
                raw = type(exc)
                raise
    except BaseException as exc:
        found.append({"raw": raw.__name__, "dist_error": issubclass(raw, dist.DistError),
                      "raised": type(exc).__name__, "waited_for": waited_for(exc)})
print(json.dumps(found))
os._exit(0)
"""


def test_gloo_failed_waits_are_told_apart_without_their_text(tmp_path):
    """What gloo (torch 2.14) raises for a peer gone and for a peer silent past the timeout: the
    same plain RuntimeError, no torch.distributed.DistError; the wire's Waiting turns each
    into PeerLost / PeerStalled naming the rank waited for (three real processes)."""
    script = tmp_path / "failed_waits.py"
    script.write_text(FAILED_WAITS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script)]
    others = [subprocess.Popen([*cmd, str(r), str(tmp_path / "store")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for r in (0, 2)]
    out = subprocess.run([*cmd, "1", str(tmp_path / "store")], env=env, capture_output=True,
                         text=True, timeout=120)
    for proc in others:
        proc.wait(timeout=60)
    lost, stalled = json.loads(out.stdout.strip().splitlines()[-1])
    assert lost == {"raw": "RuntimeError", "dist_error": False, "raised": PeerLost.__name__,
                    "waited_for": 2}
    assert stalled == {"raw": "RuntimeError", "dist_error": False,
                       "raised": PeerStalled.__name__, "waited_for": 0}
