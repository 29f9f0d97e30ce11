"""Under torchrun: a restarted job resumes from its checkpoint by itself; the run folder's lock.

The end-to-end tests start two torchrun agents on 127.0.0.1 (a 2-node simulation, one part per
"node", c10d rendezvous) and kill part 1 with SIGKILL at step 13 of 24, after the checkpoint of
step 12. With `--max-restarts 1` the job ends with the weights of a run that never stopped, bit
for bit; with `--max-restarts 0` it fails with one clear line and the checkpoint survives.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.distributed as dist

from frzoo import rundir
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.executors import elastic
from frzoo.run import train

KILL_PLUGIN = '''
import os, signal
from frzoo.plugins import register_algorithm
from frzoo.algorithms.fr import FeaturesReplay

@register_algorithm("fr_killed_once")
class KilledOnce(FeaturesReplay):
    """Features Replay whose part 1 dies by SIGKILL at step 13 of a job's first attempt."""
    def backward(self, delta, step):
        if step == 13 and self.index == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().backward(delta, step)
'''
# 64 samples / 8 = 8 steps per epoch, 3 epochs; checkpoints every 4 steps (and at epoch ends)
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=64", "data.num_test=16",
        "data.batch_size=8", "data.image_size=16", "train.epochs=3", "train.progress=false",
        "train.threads=1", "train.log_every=4", "train.checkpoint_every=4", "optimizer.lr=0.05",
        "distributed.timeout_s=20", "split.points=[layer3]", "devices=[cpu,cpu]",
        "algorithm.name=fr_killed_once"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugin") / "killed_once.py"
    path.write_text(textwrap.dedent(KILL_PLUGIN))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, plugin) -> Path:
    """The uninterrupted run, in one process (distributed equals local bit for bit at one thread
    per part: tests/test_distributed.py)."""
    out = tmp_path_factory.mktemp("reference")
    train(load_recipe(None, [*TINY, f"plugins=[{plugin}]", "executor=local", f"run.out_dir={out}"]),
          out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_agents(out: Path, plugin: str, max_restarts: int) -> Tuple[List[int], str]:
    """Run the job with two torchrun agents (nodes 0 and 1) on 127.0.0.1: their exit codes and
    their output together."""
    port = free_port()
    # pytorch/pytorch#135712: restarts need the rendezvous store kept from the workers
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
         "-m", "frzoo.cli", "run", *TINY, f"plugins=[{plugin}]", f"run.out_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for node in (0, 1)]
    results = []
    for agent in agents:
        try:
            output, _ = agent.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise
        results.append((agent.returncode, output))
    return [code for code, _ in results], "\n".join(output for _, output in results)


def same_weights(a: Path, b: Path) -> bool:
    x = torch.load(a / "final.pt", weights_only=True)
    y = torch.load(b / "final.pt", weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_if_never_stopped(
        tmp_path, plugin, reference):
    out = tmp_path / "run"
    codes, text = two_agents(out, plugin, max_restarts=1)
    assert codes == [0, 0], text[-4000:]
    assert "exitcode: -9" in text  # part 1 really died by SIGKILL
    assert "torchrun restart 1: resuming from" in text and "(step 12)" in text
    assert same_weights(out, reference)
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_without_restarts_left_the_job_fails_clearly_and_keeps_its_checkpoint(
        tmp_path, plugin, reference):
    out = tmp_path / "run"
    codes, text = two_agents(out, plugin, max_restarts=0)
    assert all(code != 0 for code in codes), text[-4000:]
    assert "frzoo: error: part 2 (rank 1" in text and "lost a neighbour" in text, text[-4000:]
    assert "(step 12)" in text and "No torchrun restarts are left (--max-restarts 0)" in text
    assert rundir.saved_step(rundir.checkpoint_path(out)) == 12
    assert not (out / "final.pt").exists()
    # the checkpoint is intact: resuming it ends where the uninterrupted run ended
    train(load_recipe(None, [*TINY, f"plugins=[{plugin}]", "executor=local",
                             f"run.out_dir={out}"]), out, resume=True)
    assert same_weights(out, reference)


# ---------------------------------------------------------------- the decision, in one process
def member(agent: str = "node0:100:5", restarts: int = 1) -> elastic._Member:
    return elastic._Member(agent, restarts)


def folder_with_checkpoint(out: Path, agents: List[str]) -> Path:
    out.mkdir()
    rundir.checkpoint_path(out).parent.mkdir()
    torch.save({"progress": {"step": 12}}, rundir.checkpoint_path(out))
    elastic._write_record(out, agents)
    return out


def test_a_restart_of_the_same_job_resumes(tmp_path, caplog):
    out = folder_with_checkpoint(tmp_path / "r", ["node0:100:5", "node1:200:7"])
    caplog.set_level("INFO", logger="frzoo")
    members = [member(restarts=0), member("node1:200:7", 1)]
    assert elastic._decide(out, False, members) is True
    assert caplog.messages == [f"torchrun restart 1: resuming from {rundir.checkpoint_path(out)} "
                               f"(step 12)"]


def test_a_first_start_or_another_jobs_folder_is_refused_as_without_torchrun(tmp_path):
    out = folder_with_checkpoint(tmp_path / "r", ["node0:100:5"])
    for members in ([member(restarts=0)],             # no restart: a fresh start
                    [member("node0:999:5", 1)]):      # a restart of another job
        with pytest.raises(FrzooError, match="already holds a run"):
            elastic._decide(out, False, members)
    # a restart before the first checkpoint starts afresh
    assert elastic._decide(tmp_path / "new", False, [member()]) is False


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_the_run_folder_lock_holds_under_torchrun(tmp_path, one_rank_group):
    out = tmp_path / "r"
    out.mkdir()
    with rundir.lock(out):  # another job writes the folder
        with pytest.raises(FrzooError, match="is in use by another frzoo run"):
            with elastic.join_run_folder(out, False, leader=0):
                pass
    with elastic.join_run_folder(out, False, leader=0) as (resume, where):
        assert resume is False and where == out
        with pytest.raises(FrzooError, match="is in use by another frzoo run"):
            with rundir.lock(out):
                pass
    assert not (out / ".lock").exists()


def test_torch_shared_store_is_named_at_start_and_on_a_failed_restart(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in elastic.restart_warning()
    error = RuntimeError("Gloo connectFullMesh failed")
    assert elastic.explain_init_failure(error) is error  # a first start: kept as it is
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(elastic.explain_init_failure(error))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert elastic.restart_warning() is None
