"""Helpers for the tests that are not tests themselves: recipe plugins that the tests list in
`plugins:` (loaded by path in every process of a job: nccl_emulation, fp16_overflow,
replica_probe, replica_after_backward), a reader of offline W&B run files (wandb_offline), and
worker functions that report what a launched process finds when it starts (launch_probe).
pytest collects nothing here (no file is named test_*.py)."""
from pathlib import Path

HERE = Path(__file__).parent
EMULATION = HERE / "nccl_emulation.py"  # NCCL's point-to-point rules, emulated on gloo
OVERFLOW = HERE / "fp16_overflow.py"  # an fp16 overflow at a chosen step
PROBE = HERE / "replica_probe.py"  # small gradient buckets; records the collectives
AFTER = HERE / "replica_after_backward.py"  # replicas sum gradients after the backward
