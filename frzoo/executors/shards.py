"""Checkpoint shards of replicated jobs: one pipeline's state from its R copies, and back.

Every delta a part sends down is the delta of the global batch's loss for its rows
(frzoo.executors.replicas.ShardLoss), so the messages, histories and mailboxes of R replicas
concatenated are those of one pipeline: a checkpoint holds that one pipeline's state and is
independent of R (:func:`merge_part_states` writes it, :func:`shard_state` cuts a replica's rows
out of it again, whatever R wrote it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from ..data import shard_rows
from .topology import Layout


def merge_part_states(states: Sequence[Dict[str, Any]], batch_keys: Sequence[str]
                      ) -> Dict[str, Any]:
    """One part's checkpoint state from its R copies: replica 0's weights and optimizer state
    (every copy holds the same: they step on the same summed gradient; buffers were broadcast),
    and the algorithm's per-sample state (`batch_keys`: lists of batch-first tensors, e.g.
    Features Replay's history) concatenated over the replicas, i.e. the global batch's."""
    merged = dict(states[0])
    algorithm = dict(states[0]["algorithm"])
    for key in batch_keys:
        if key in algorithm:
            algorithm[key] = concat_shards([s["algorithm"][key] for s in states])
    merged["algorithm"] = algorithm
    return merged


def concat_shards(shards: Sequence[Sequence[Any]]) -> List[Any]:
    """[t_0 of replica 0 ++ t_0 of replica 1 ++ ..., t_1 ..., ...]: per entry, the rows of all
    replicas in replica order. An entry is a tensor, or (a cut crossed by several tensors,
    frzoo.activation's saved form) a list of tensors and Nones, concatenated tensor by tensor."""
    return [concat_copies(entry) for entry in zip(*shards)]


def concat_copies(copies: Sequence[Any]) -> Any:
    if isinstance(copies[0], Tensor):
        return torch.cat(copies)
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*copies)]


def shard_tensors(entries: Sequence[Any], layout: Layout) -> List[Any]:
    """This replica's rows of each global-batch entry (the inverse of concat_shards)."""
    out: List[Any] = []
    for entry in entries:
        tensors = [entry] if isinstance(entry, Tensor) else [t for t in entry if t is not None]
        lo, hi = shard_rows(tensors[0].shape[0], layout.replica, layout.replicas)
        out.append(entry[lo:hi] if isinstance(entry, Tensor)
                   else [None if t is None else t[lo:hi] for t in entry])
    return out


def shard_state(state: Dict[str, Any], batch_keys: Sequence[str], layout: Layout
                ) -> Dict[str, Any]:
    """A part's checkpoint state (global batch) with its per-sample entries cut to this
    replica's rows: what this replica held when the checkpoint was written."""
    algorithm = dict(state["algorithm"])
    for key in batch_keys:
        if key in algorithm:
            algorithm[key] = shard_tensors(algorithm[key], layout)
    return {**state, "algorithm": algorithm}
