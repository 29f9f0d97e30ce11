"""A recipe plugin for the fp16 tests (`plugins: [this file]`): Features Replay whose last part
overflows at one chosen step (`algorithm.overflow_at`), as a loss scale far too large would; with
data-parallel replicas, optionally in one replica only (`algorithm.overflow_rank`, a global rank).

The last part's scaled loss is multiplied by inf at that step only, so its gradients and the
delta it sends down are non-finite while the loss it reports stays finite: exactly what an fp16
overflow looks like to the rest of the pipeline (frzoo/loss_scale.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor

from frzoo.algorithms.base import Delta
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.plugins import register_algorithm


@register_algorithm("fr_fp16_overflow")
class OverflowAt(FeaturesReplay):
    @dataclass(frozen=True)
    class Options(FeaturesReplay.Options):
        overflow_at: int = 4
        overflow_rank: int = -1  # with processes: only this global rank's part (-1: every one)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.now = -1

    def backward(self, delta: Delta, step: int) -> Optional[Tensor]:
        self.now = step
        return super().backward(delta, step)

    def _scaled_loss(self) -> Tensor:
        loss = super()._scaled_loss()
        rank = self.options.overflow_rank
        here = rank < 0 or not dist.is_initialized() or dist.get_rank() == rank
        return loss * math.inf if self.now == self.options.overflow_at and here else loss
