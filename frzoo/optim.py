"""Per-part optimizers and the learning-rate schedule.

The schedule is a pure function of the global step, so resuming needs no scheduler state and
every part (in any process) computes the same rate for the same step.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional

import torch
from omegaconf import DictConfig

from .errors import RecipeError


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    """One optimizer for one part's parameters (the authors' code uses one per part too).

    A part may hold no parameters (a cut that leaves only a dropout, a reshape or a pooling
    between two others): it still runs, sends its input's gradient down and takes its step with
    everyone else, so it gets an optimizer with one empty group, whose step does nothing and
    whose state (and checkpoint entry) is empty. torch refuses an empty parameter list, not an
    empty group."""
    params: List[Any] = list(params) or [{"params": []}]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    # adamw: the schema admits no other name (frzoo.config)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, steps_per_epoch: int, total_steps: int, cfg: DictConfig) -> float:
    """Factor on the base lr at `step` (0-based), from the `optimizer.schedule` section."""
    epoch = step / max(steps_per_epoch, 1)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    # cosine: the schema admits no other name (frzoo.config)
    start = cfg.warmup_epochs * steps_per_epoch
    progress = min(1.0, (step - start) / max(total_steps - start, 1))
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def part_lr_scales(scales: Optional[Iterable[float]], num_parts: int) -> list:
    if scales is None:
        return [1.0] * num_parts
    scales = list(scales)
    if len(scales) != num_parts:
        raise RecipeError(f"optimizer.part_lr_scale has {len(scales)} values but the split has "
                          f"{num_parts} parts; give one multiplier per part (e.g. "
                          f"{[2.0] + [1.0] * (num_parts - 1)}).")
    return [float(s) for s in scales]
