"""Workers for tests/test_distributed.py's checks of how frzoo's launcher starts its processes
(frzoo.executors.fork_server): `report` writes what a worker finds when it starts; `report_and_wait`
does so, then waits to be stopped. They are `worker` functions of frzoo.executors.launch.launch.

This module imports nothing heavy, so that what a worker finds imported came from the server.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def report(cfg: Any, out_dir: Path, resume: bool, rank: int, world_size: int) -> None:
    """Write out_dir/probe-RANK.json: what this worker found; rank 0 writes the summary."""
    preloaded = sorted(name for name in ("timm", "frzoo.run") if name in sys.modules)
    import torch  # noqa: PLC0415 - after the check above (launch.py has imported it anyway)
    seen = {"pid": os.getpid(), "parent": os.getppid(), "preloaded": preloaded,
            "launcher": multiprocessing.parent_process().pid,
            "cuda_initialized": torch.cuda.is_initialized(),
            "probe": os.environ.get("FRZOO_PROBE"), "tmp": tempfile.gettempdir()}
    (out_dir / f".probe-{rank}.tmp").write_text(json.dumps(seen))
    os.replace(out_dir / f".probe-{rank}.tmp", out_dir / f"probe-{rank}.json")
    if rank == 0:
        (out_dir / "summary.json").write_text("{}")


def report_and_wait(cfg: Any, out_dir: Path, resume: bool, rank: int, world_size: int) -> None:
    report(cfg, out_dir, resume, rank, world_size)
    time.sleep(600)
