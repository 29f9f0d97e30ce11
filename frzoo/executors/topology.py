"""Which rank holds what: the rank layout of a distributed job and its process groups.

A job runs R replicas (`distributed.replicas`) of a pipeline of K parts in R x K processes. The
layout is replica-major: rank = r * K + k runs part k+1 of replica r, so a replica's parts are
consecutive ranks (under torchrun, on one node: activations and deltas stay on its fast links)
and only the copies of one part, which sit K ranks apart, talk across replicas. Every
distributed run has a layout, with or without replicas (R = 1); the leader, which logs and
writes files, is replica 0's last part.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Where rank `rank` sits among R replicas of K parts (replica-major)."""
    rank: int
    parts: int  # K
    replicas: int = 1  # R

    @property
    def replica(self) -> int:
        return self.rank // self.parts

    @property
    def part(self) -> int:
        """0-based index of the part this rank runs."""
        return self.rank % self.parts

    @property
    def world(self) -> int:
        return self.parts * self.replicas

    @property
    def is_first(self) -> bool:
        """Whether this rank runs the first part (it reads the data and sends the labels)."""
        return self.part == 0

    @property
    def is_last(self) -> bool:
        """Whether this rank runs the last part (it has the loss)."""
        return self.part == self.parts - 1

    def rank_of(self, part: int, replica: Optional[int] = None) -> int:
        """The global rank of `part` (0-based) in `replica` (default: this rank's)."""
        return (self.replica if replica is None else replica) * self.parts + part

    @property
    def leader(self) -> int:
        """The rank that logs and writes files: the last part of replica 0."""
        return self.parts - 1

    def name(self, rank: Optional[int] = None) -> str:
        """`part k (rank n)`, or `part k of replica r (rank n)` when there are replicas."""
        rank = self.rank if rank is None else rank
        where = f" of replica {rank // self.parts}" if self.replicas > 1 else ""
        return f"part {rank % self.parts + 1}{where} (rank {rank})"


def part_groups(layout: Layout, timeout_s: float) -> List[Any]:
    """One process group per part: the R copies of part k (ranks k, K+k, 2K+k, ...). Every rank
    creates all K groups, in part order (torch requires every rank to take part in each
    new_group call, in the same order)."""
    return [dist.new_group([layout.rank_of(k, r) for r in range(layout.replicas)],
                           timeout=timedelta(seconds=timeout_s))
            for k in range(layout.parts)]
