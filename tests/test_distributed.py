"""One process per part on torch.distributed (gloo, CPU): exactness, failures, start-up errors.

Exactness compares with the single-process executor at one thread per process: the number of
intra-op threads changes how float reductions are split, so equal thread counts are part of the
reference, not a tolerance.
"""
from __future__ import annotations

import multiprocessing
import socket
import textwrap
import time
from pathlib import Path

import pytest
import torch

from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.run import train

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
def test_distributed_equals_local_bit_for_bit(tmp_path, algo, k):
    run(tmp_path / "local", SPLITS[k], f"algorithm.name={algo}")
    summary = run(tmp_path / "dist", SPLITS[k], f"algorithm.name={algo}", "executor=distributed")
    assert same_weights(tmp_path / "local", tmp_path / "dist")
    # same outputs as a local run: checkpoint (with the delta in flight), metrics, summary
    a = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "dist" / "checkpoints" / "last.pt", weights_only=True)
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
    run(tmp_path / "straight", SPLITS[3], "train.max_steps=8")
    run(tmp_path / "r", SPLITS[3], "train.max_steps=4", "executor=distributed")
    run(tmp_path / "r", SPLITS[3], "train.max_steps=8", "executor=local", resume=True)
    assert same_weights(tmp_path / "straight", tmp_path / "r")


# One algorithm name per plugin file: the launching process imports the recipe's plugins too (it
# checks the algorithm's options before any worker starts), and the tests share one process.
FAILING_PLUGIN = '''
import os, signal
from frzoo.plugins import register_algorithm
from frzoo.algorithms.fr import FeaturesReplay

@register_algorithm("fr_breaks_{index}")
class Breaks(FeaturesReplay):
    def backward(self, delta, step):
        if step == 5 and self.index == {index}:
            {action}
        return super().backward(delta, step)
'''


def plugin(tmp_path: Path, index: int, action: str) -> str:
    path = tmp_path / f"breaks_{index}.py"
    path.write_text(textwrap.dedent(FAILING_PLUGIN.format(index=index, action=action)))
    return str(path)


def test_a_worker_that_raises_stops_the_job_and_names_part_rank_and_error(tmp_path):
    path = plugin(tmp_path, 1, 'raise ValueError("boom in the replay")')
    start = time.time()
    with pytest.raises(RuntimeError, match=r"part 2 \(rank 1.*ValueError: boom in the replay"):
        run(tmp_path / "r", SPLITS[3], f"plugins=[{path}]", "algorithm.name=fr_breaks_1",
            "executor=distributed", "train.checkpoint_every=2")
    assert time.time() - start < 60
    assert not multiprocessing.active_children()
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 5  # the last complete checkpoint (epoch end) survives


def test_a_killed_worker_stops_the_job_within_seconds(tmp_path):
    path = plugin(tmp_path, 0, "os.kill(os.getpid(), signal.SIGKILL)")
    start = time.time()
    with pytest.raises(RuntimeError, match=r"part 1 \(rank 0\) was killed by signal SIGKILL"):
        run(tmp_path / "r", SPLITS[2], f"plugins=[{path}]", "algorithm.name=fr_breaks_0",
            "executor=distributed", "train.checkpoint_every=2")
    assert time.time() - start < 60
    assert not multiprocessing.active_children()
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] == 5


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
