"""Checks that need the whole recipe, made before any process starts or any file is written.

A refusal found after the workers started costs a start-up (tens of seconds, a GPU allocation)
and, found at an epoch's last step, the epoch itself. So `frzoo run` asks here first, in the
process that launches the others (and each process checks the batches again with the data it
built, which costs nothing):

- **Resume**: the recipe may change only the keys of frzoo.checkpoint.RESUMABLE_CHANGES (how
  long, how often, where, which processes, and the layout: split and algorithm). Checked against
  the recipe the checkpoint holds, read without loading its tensors. Changing
  `distributed.replicas` without `distributed.sync_bn` is allowed but changes what BatchNorm
  normalises over: said in one line.
- **Batches**: BatchNorm in training needs at least 2 rows per replica in every batch, the
  epoch's last (smaller) batch included (:func:`check_shards`); each replica needs at least one
  row whatever the model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from . import rundir
from .checkpoint import check_recipe, open_checkpoint
from .config import to_container
from .data import DataInfo, build_data, last_batch_rows, shard_rows
from .errors import FrzooError
from .models import create_model
from .pipeline import load_plugins, model_kwargs

Echo = Callable[[str], None]
_BATCHNORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm


class _Facts:
    """What the checks need of the data and the model, found only if asked (the data once)."""

    def __init__(self, cfg: DictConfig, info: Optional[DataInfo]) -> None:
        self.cfg, self._info = cfg, info

    def info(self) -> DataInfo:
        if self._info is None:
            load_plugins(self.cfg.plugins)  # a recipe plugin may register the data set
            self._info = build_data(self.cfg.data, self.cfg.train.seed).info
        return self._info

    def model(self) -> Optional[nn.Module]:
        """The model on the meta device (no memory, no weights), in training mode; None where
        it cannot be built here (the build proper then explains why)."""
        kwargs = model_kwargs(self.cfg.model, self.info())  # the data built on the CPU
        try:
            with torch.device("meta"):
                return create_model(self.cfg.model.name, kwargs).train()
        except Exception:  # noqa: BLE001 - reported by the real build
            return None

    def batchnorm(self) -> bool:
        model = self.model()
        return model is not None and any(isinstance(m, _BATCHNORM) for m in model.modules())

    def batchnorm_fails(self, rows: int) -> bool:
        """Whether a training step on `rows` rows gives a BatchNorm one value per channel,
        which torch refuses (a 1-row batch where the feature map is 1x1): a forward on the
        meta device records what each BatchNorm sees. Where that forward cannot run, any
        BatchNorm counts."""
        model = self.model()
        layers = [m for m in model.modules() if isinstance(m, _BATCHNORM)] if model else []
        if not layers:
            return False
        seen: List[int] = []
        for layer in layers:
            layer.register_forward_pre_hook(lambda _, args: seen.append(
                args[0].numel() // max(1, args[0].shape[1])))
        info = self.info()
        try:
            with torch.device("meta"):
                model(torch.empty(rows, info.channels, info.image_size, info.image_size))  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - torch refusing the BatchNorm, or a model meta cannot run
            if not any(v <= 1 for v in seen):
                return True
        return any(v <= 1 for v in seen)


def check_resume(cfg: DictConfig, out_dir: Path, resume: bool, echo: Echo) -> None:
    """Refuse a resume whose recipe changes what may not change, before any process starts and
    before the algorithm's options are read; say when a new replica count changes BatchNorm.
    Nothing to do for a fresh start."""
    path = rundir.checkpoint_path(out_dir)
    if not resume or not path.exists():
        return  # rundir.prepare says there is nothing to resume
    saved = open_checkpoint(path).meta["recipe"]
    # split.auto: the resume reuses the points the first start chose (run.resolve_split)
    check_recipe(saved, to_container(cfg), path,
                 skip=("split.",) if cfg.split.auto is not None else ())
    was = int((saved.get("distributed") or {}).get("replicas", 1))
    now = int(cfg.distributed.replicas)
    if was != now and not cfg.distributed.sync_bn and _Facts(cfg, None).batchnorm():
        rows = cfg.data.batch_size
        echo(f"resuming with distributed.replicas={now} (was {was}) without "
             f"distributed.sync_bn: BatchNorm now normalises over {rows // now} rows per "
             f"replica instead of {rows // was}, so the run departs from one that kept {was} "
             f"by more than float rounding (docs/distributed.md).")


def check_microbatches(microbatches: int, batch: int, last: int, replicas: int) -> None:
    """A synchronous schedule (gpipe, 1f1b, zb1) splits each replica's share of every batch, the
    epoch's last included, into `microbatches` equal micro-batches."""
    for rows in (batch, last) if microbatches > 1 else ():
        for shard in sorted({hi - lo for lo, hi in (shard_rows(rows, r, replicas)
                                                    for r in range(replicas))} if rows else ()):
            if shard % microbatches:
                where = f"data.batch_size={batch}" if rows == batch else \
                    f"the epoch's last batch ({rows} rows)"
                per = f", {shard} rows per replica" if replicas > 1 else ""
                raise FrzooError(
                    f"algorithm.microbatches={microbatches} does not divide {where}{per}: every "
                    f"micro-batch must have the same rows. "
                    + ("Set data.drop_last=true, or choose a divisor." if rows != batch else
                       f"Choose a divisor, or set data.batch_size to a multiple of "
                       f"{microbatches * replicas}."))


def check_shards(cfg: DictConfig, info: Optional[DataInfo] = None, microbatches: int = 1) -> None:
    """Every replica needs rows in every step; with BatchNorm (and no distributed.sync_bn
    across replicas) at least 2: a 1-row BatchNorm fails in training, at the epoch's last
    step, losing the epoch. `info`: the data's, where the caller built it (else it is built
    here, when the size of the epoch's last batch matters)."""
    facts = _Facts(cfg, info)
    replicas, batch = int(cfg.distributed.replicas), int(cfg.data.batch_size)
    last = last_batch_rows(facts.info().num_train, batch, cfg.data.drop_last)
    if 0 < last < replicas:
        raise FrzooError(f"the last batch of each epoch has {last} samples "
                         f"({facts.info().num_train} training samples, data.batch_size={batch}), "
                         f"fewer than distributed.replicas={replicas}: every replica needs at "
                         f"least one. Set data.drop_last=true or change data.batch_size.")
    check_microbatches(microbatches, batch, last, replicas)
    synced = cfg.distributed.sync_bn and replicas > 1  # statistics over the whole batch
    rows = min(n // replicas for n in (batch, last) if n)  # the smallest shard
    if synced or rows >= 2 or not facts.batchnorm_fails(rows):
        return
    small = last if last and last // replicas < 2 else batch
    where = (f"the last batch of each epoch has {last} row{'s' if last != 1 else ''} "
             f"({facts.info().num_train} training "
             f"samples, data.batch_size={batch})" if small == last else f"data.batch_size={batch}")
    if replicas > 1:
        where += (f"; split over distributed.replicas={replicas}, a replica gets {rows} "
                  f"row{'s' if rows != 1 else ''}")
    fixes = ["data.drop_last=true"] if small == last else []
    fixes.append(f"data.batch_size={_fitting_batch(facts, batch, replicas)}")
    if replicas > 1:
        fixes.append("distributed.sync_bn=true (statistics over the whole batch)")
    raise FrzooError(f"{where}: a BatchNorm of model '{cfg.model.name}' would see one value "
                     f"per channel, which training refuses, so the run would fail at that step "
                     f"and lose the epoch (BatchNorm needs at least 2 rows"
                     f"{' per replica' if replicas > 1 else ''} here). Set "
                     + ", or ".join(fixes) + ".")


def _fitting_batch(facts: _Facts, batch: int, replicas: int) -> int:
    """The batch size nearest `batch` (a multiple of `replicas`) whose every shard has 2 rows."""
    drop_last = facts.cfg.data.drop_last
    n = 0 if drop_last else facts.info().num_train

    def fits(b: int) -> bool:
        last = last_batch_rows(n, b, drop_last)
        return b // replicas >= 2 and (last == 0 or last // replicas >= 2)

    candidates = [b for b in range(2 * replicas, max(batch, 2 * replicas) * 2 + 1, replicas)
                  if fits(b)]
    return min(candidates, key=lambda b: (abs(b - batch), b), default=2 * replicas * math.ceil(
        batch / (2 * replicas)))
