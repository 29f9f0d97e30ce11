"""A quickstart-size run resumed with another layout: does the loss continue (docs/checkpoints.md)?

recipes/quickstart.yaml (resnet18 on digits, K=2, fr, 184 steps, the loss logged every step):
one run straight through; one stopped at step 92 (the middle of epoch 4, as by Ctrl-C) and resumed with K=4
(`split.points=[layer2,layer3,layer4]`, four devices); the same stopped run resumed with
`algorithm.name=bp`. Printed per run: the loss of the last steps before and the first steps
after step 92, the largest step-to-step change of the loss in the epoch before (steps 70-92),
the change across the resume, and the final test accuracy; `frzoo report` plots the three.

    python bench/resume_layouts.py /tmp/resume-layouts
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from frzoo.cli import main as frzoo
from frzoo.config import load_recipe
from frzoo.messages import show_on_stderr
from frzoo.run import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
STOP = 92
CHANGES = {"k4": ["split.points=[layer2,layer3,layer4]", "devices=[cpu,cpu,cpu,cpu]"],
           "bp": ["algorithm.name=bp"]}


def run(out: Path, *extra: str, resume: bool = False, stop_at: int = 0) -> Dict:
    """A quickstart run; `stop_at`: stopped there as by Ctrl-C (the lr schedule keeps the whole
    run's horizon, which `train.max_steps` would shorten)."""
    cfg = load_recipe(str(RECIPE), ["train.log_every=1", "train.progress=false", *extra,
                                    f"run.out_dir={out}"])
    asked: List[int] = []
    return train(cfg, out, resume=resume,
                 should_stop=lambda: bool(stop_at) and (asked.append(1) or len(asked) > stop_at))


def losses(out: Path) -> Dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if r["kind"] == "train"}


def row(name: str, loss: Dict[int, float], summary: Dict) -> List[str]:
    before = [abs(loss[s] - loss[s - 1]) for s in range(70, STOP + 1)]
    return [name, " ".join(f"{loss[s]:.3f}" for s in range(STOP - 2, STOP + 1)),
            " ".join(f"{loss[s]:.3f}" for s in range(STOP + 1, STOP + 4)),
            f"{max(before):.3f}", f"{abs(loss[STOP + 1] - loss[STOP]):.3f}",
            f"{summary['final_test_acc1']:.2f}"]


def main() -> None:
    show_on_stderr()
    root = Path(sys.argv[1])
    straight = root / "straight"  # kept from an earlier call of this script: it never changes
    summaries = {"straight": json.loads((straight / "summary.json").read_text())
                 if (straight / "summary.json").is_file() else run(straight)}
    for name in ("k2", *CHANGES, "report"):
        shutil.rmtree(root / name, ignore_errors=True)
    run(root / "k2", stop_at=STOP)
    for name, change in CHANGES.items():
        shutil.copytree(root / "k2", root / name)
        summaries[name] = run(root / name, *change, resume=True)
    frzoo(["report", *(str(root / n) for n in summaries), "-o", str(root / "report")])
    print("| run | loss at steps 90-92 | loss at steps 93-95 | largest step-to-step change, "
          "steps 70-92 | change 92 -> 93 | final test acc |")
    print("|---|---|---|---|---|---|")
    for name, summary in summaries.items():
        print("| " + " | ".join(row(name, losses(root / name), summary)) + " |")


if __name__ == "__main__":
    main()
