"""Fixtures shared by several test files, and how the suite runs in parallel.

The suite runs on pytest-xdist workers (`-n auto` in pyproject.toml: one worker per core, at
most MAX_WORKERS). Each worker is a process of its own, so a test never relies on another
test's registrations, files or threads; what must not collide between workers (run folders,
plugin files, ports) comes from tmp_path or the OS. Two rules make the workers share the cores
instead of fighting over them:

- torch's intra-op threads per worker: the cores divided among the workers (1 on a 2-core
  machine). A test whose result depends on a thread count sets it (`train.threads`), as the
  exactness tests do; the workers of a distributed job set their own.
- the longest tests are handed out first (`slow`, longest of all `slow(seconds=N)`), so that the
  last test a worker runs is a short one and no worker finishes long before the other
  (`--dist worksteal` then evens out the rest);
- OpenMP threads that wait sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless set), in
  the workers and in every process a test starts: a thread that spins for its descheduled
  sibling holds a core another process needs. One epoch of the quickstart (2 threads) on the
  shared 2-core machine: 75 s spinning, 18 s passive. The wait policy changes no result.
"""
from __future__ import annotations

import os
from typing import List

import pytest

MAX_WORKERS = 8  # a worker holds about 2 GB, and its jobs start up to 4 processes more

# Read when torch loads OpenMP: set here, before any worker or test process imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most MAX_WORKERS."""
    return max(1, min(cores(), MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: its share of the cores as torch's intra-op threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, cores() // workers))


def expected_seconds(item: pytest.Item) -> float:
    """What the scheduler knows of a test's length: `slow(seconds=N)` (N: measured under xdist
    on the 2-core machine), 60 for another `slow` test, 0 for the rest."""
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("seconds", 60))


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """The longest tests first (a stable sort: a file's slow tests stay together and in order,
    so a module-scoped fixture they share is built once per worker)."""
    items.sort(key=lambda item: -expected_seconds(item))


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No key, no server, nothing written outside tmp_path, whatever the caller's environment."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE",
                "WANDB_RUN_ID", "WANDB_SWEEP_ID", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                "http_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
