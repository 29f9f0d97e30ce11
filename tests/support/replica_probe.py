"""A recipe plugin for tests/test_replicas.py (`plugins: [this file]`): gradient buckets small
enough that every part has several, and, when the environment variable FRZOO_TEST_PROBE names a
folder, a record of what each process does across the replicas, one JSON line per event in
`RANK.jsonl` there:

- every all_reduce, broadcast and reduce: its group's ranks, the tensor's size and dtype, whether
  it was asynchronous and whether it was issued inside a backward (from a gradient hook);
- every read of the part's loss scaler (fp16; each log point): skipped steps and scale.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Dict

import torch
import torch.distributed as dist

from frzoo.executors import replicas
from frzoo.loss_scale import LossScaler

replicas.BUCKET_BYTES = 128 * 1024  # part 1 of test_resnet in 2 buckets, part 2 in 8


def record(entry: Dict[str, Any]) -> None:
    folder = os.environ.get("FRZOO_TEST_PROBE")
    if folder and dist.is_initialized():
        with open(os.path.join(folder, f"{dist.get_rank()}.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")


def collective(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def recorded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        record({"what": name, "numel": tensor.numel(), "dtype": str(tensor.dtype),
                "group": dist.get_process_group_ranks(group) if group is not None else None,
                "async": bool(kwargs.get("async_op", False)),
                "in_backward": torch._C._current_graph_task_id() != -1})
        return call(tensor, *args, **kwargs)
    recorded.probed = True  # type: ignore[attr-defined]
    return recorded


for _name in ("all_reduce", "broadcast", "reduce"):
    if not getattr(getattr(dist, _name), "probed", False):  # once per process
        setattr(dist, _name, collective(_name, getattr(dist, _name)))

if not getattr(LossScaler.read, "probed", False):
    _read = LossScaler.read

    def read(self: LossScaler) -> Dict[str, float]:
        out = _read(self)
        record({"what": "scaler", **out})
        return out

    read.probed = True  # type: ignore[attr-defined]
    LossScaler.read = read  # type: ignore[method-assign]
