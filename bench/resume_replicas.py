"""Changing `distributed.replicas` on resume: how far the resumed run lands from the run that
kept its R, with and without `distributed.sync_bn` (docs/distributed.md).

tests/test_replicas.py's setup (test_resnet at 16x16, 39 samples in batches of 8, K=2, lr 0.01,
20 steps): one run at R=2 throughout; one at R=2 for 10 steps, resumed at R=1 (one process) for
the other 10. Printed: the largest absolute difference of their final weights.

    python bench/resume_replicas.py /tmp/resume-replicas
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from frzoo.config import load_recipe
from frzoo.messages import show_on_stderr
from frzoo.run import train

EMULATION = Path(__file__).resolve().parents[1] / "tests" / "support" / "nccl_emulation.py"
TINY = ["model.name=test_resnet", "data.name=synthetic", "data.num_train=39", "data.num_test=20",
        "data.batch_size=8", "data.image_size=16", "train.epochs=4", "train.eval_every=2",
        "train.progress=false", "train.threads=1", "train.log_every=5", "optimizer.lr=0.01",
        "distributed.timeout_s=60", "split.points=[layer3]", f"plugins=[{EMULATION}]"]


def run(out: Path, *extra: str, resume: bool = False) -> None:
    train(load_recipe(None, [*TINY, *extra, f"run.out_dir={out}"]), out, resume=resume)


def max_diff(a: Path, b: Path) -> float:
    x = torch.load(a / "final.pt", weights_only=True)
    y = torch.load(b / "final.pt", weights_only=True)
    return max((x[k].double() - y[k].double()).abs().max().item()
               for k in x if x[k].is_floating_point())


def main() -> None:
    show_on_stderr()  # frzoo's messages, as the command line shows them
    root = Path(sys.argv[1])
    for sync in ("true", "false"):
        kept, changed = root / f"kept-sync_bn-{sync}", root / f"changed-sync_bn-{sync}"
        run(kept, "distributed.replicas=2", f"distributed.sync_bn={sync}")
        run(changed, "distributed.replicas=2", f"distributed.sync_bn={sync}", "train.max_steps=10")
        run(changed, "distributed.replicas=1", f"distributed.sync_bn={sync}", "executor=local",
            resume=True)
        print(f"sync_bn={sync}: R=2 for 10 steps then R=1 for 10, against R=2 for 20: "
              f"max |weight difference| {max_diff(kept, changed):.2e}")


if __name__ == "__main__":  # the spawned workers import this file: run only here
    main()
