"""Deterministic batching: the one place that orders, shards, augments and batches a data set.

Why it looks like this: Features Replay runs each part of the model in its own worker, and a run
must resume bit for bit. So every random choice about data is a pure function of
``(seed, epoch[, batch])``, never of the global RNG, the worker count or how far a previous run
got:

* the sample order of epoch ``e`` is ``randperm(n)`` from a ``torch.Generator`` seeded by
  ``(seed, e)`` (identity order when ``data.shuffle=false``);
* augmentation runs on the whole batch in the main process with a generator seeded by
  ``(seed, e, batch_index)`` -- data loader workers only fetch samples;
* ``train_batches(e, start_batch=b)`` yields exactly batches ``b, b+1, ...`` of
  ``train_batches(e)`` without fetching the skipped ones.

What the data set holds and where it comes from is not this module's concern: it receives two
datasets and their :class:`DataInfo` from :func:`frzoo.data.build.build_data`.
"""
from __future__ import annotations

import hashlib
import math
import traceback
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import FrzooError
from .sets import DataInfo, TensorDataset, TensorPair, resize_images, to_unit

AUGMENTS = ("standard", "crop", "none")
CROP_PADDING = 4


# ---------------------------------------------------------------- determinism helpers
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and platforms."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def last_batch_rows(num_train: int, batch_size: int, drop_last: bool) -> int:
    """The rows of each epoch's last batch when it is smaller than `batch_size`, else 0: the one
    rule, for a DataModule and for the checks that run before one exists (frzoo.preflight)."""
    return 0 if drop_last else num_train % batch_size


def shard_rows(rows: int, replica: int, replicas: int) -> Tuple[int, int]:
    """The rows [lo, hi) of a global batch of `rows` that replica `replica` of `replicas` takes:
    contiguous, in replica order (so the shards concatenated are the global batch), as equal as
    the row count allows (only an epoch's last, smaller batch can be uneven)."""
    return rows * replica // replicas, rows * (replica + 1) // replicas


def augment_batch(x: Tensor, mode: str, generator: torch.Generator,
                  padding: int = CROP_PADDING, rows: Optional[Tuple[int, int]] = None) -> Tensor:
    """Per-sample random crop (zero padding) and, for `standard`, horizontal flip (p=0.5).

    ``x`` is a float batch (B, C, H, W) in [0, 1] units (before normalization, so padding is
    black as in torchvision's RandomCrop). Vectorized: one gather for all crops. ``rows`` =
    (first row, global rows): ``x`` is that shard of a global batch (a replica's); the random
    draws are those of the global batch, so each sample gets the crop and flip it gets there.
    """
    if mode == "none" or x.shape[0] == 0:
        return x
    b, c, h, w = x.shape
    lo, total = rows if rows is not None else (0, b)
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (total,), generator=generator)[lo:lo + b]
    ox = torch.randint(0, 2 * padding + 1, (total,), generator=generator)[lo:lo + b]
    rows = oy[:, None] + torch.arange(h)  # (B, H)
    cols = ox[:, None] + torch.arange(w)  # (B, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    if mode == "standard":
        flip = torch.rand(total, generator=generator)[lo:lo + b] < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def _collate_tensor(batch: TensorPair) -> TensorPair:
    """A TensorDataset's batch is already one (x, y) pair (its ``__getitems__``)."""
    return batch


class DataModule:
    """Deterministic train/test batches over one data set; see the module docstring."""

    def __init__(self, train: Dataset, test: Dataset, info: DataInfo, *, seed: int,
                 batch_size: int, eval_batch_size: Optional[int] = None,
                 augment: str = "standard", normalize: bool = True, shuffle: bool = True,
                 num_workers: int = 0, drop_last: bool = False) -> None:
        # The values come validated from the recipe schema (frzoo.config): trusted here.
        self.train_set, self.test_set, self.info = train, test, info
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.augment, self.normalize = augment, normalize
        self.shuffle, self.num_workers, self.drop_last = shuffle, int(num_workers), drop_last
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.steps_per_epoch() == 0:
            raise FrzooError(
                f"data.batch_size={batch_size} is larger than the {info.num_train} training "
                f"samples and data.drop_last=true, so an epoch has no batches. Lower "
                f"data.batch_size or set data.drop_last=false.")

    # -------------------------------------------------------- order
    def steps_per_epoch(self) -> int:
        n = self.info.num_train
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -------------------------------------------------------- batch sizes
    # Every question about how many rows a batch (or a replica's share of one) has is answered
    # in this block: the distributed executor predicts each message's shape from it before the
    # message exists (frzoo.executors.schedule), the replicas split and gather by it, and the
    # run checks the replicas' shards with it before any process starts (frzoo.run).
    def batch_rows(self, step: int) -> int:
        """The rows of training step `step`'s global batch (every epoch has the same batches;
        only an epoch's last one may be smaller)."""
        if self.drop_last:
            return self.batch_size
        index = step % self.steps_per_epoch()
        return min(self.batch_size, self.info.num_train - index * self.batch_size)

    def shard_size(self, step: int, replica: int = 0, replicas: int = 1) -> int:
        """The rows replica `replica` of `replicas` takes of step `step`'s batch (:func:`shard_rows`)."""
        lo, hi = shard_rows(self.batch_rows(step), replica, replicas)
        return hi - lo

    def shard_sizes(self, step: int, replicas: int) -> List[int]:
        """Every replica's rows of step `step`'s batch, in replica order (they add up to it)."""
        return [self.shard_size(step, r, replicas) for r in range(replicas)]

    def last_batch_rows(self) -> int:
        """The rows of each epoch's last batch when it is smaller than data.batch_size, else 0."""
        return last_batch_rows(self.info.num_train, self.batch_size, self.drop_last)

    def test_batch_rows(self, replica: int = 0, replicas: int = 1) -> List[int]:
        """The rows of each test batch replica `replica` of `replicas` evaluates, in order: the
        batches :meth:`test_batches` yields to it."""
        n, size = self.info.num_test, self.eval_batch_size
        return [min(size, n - i) for i in range(0, n, size)][replica::replicas]

    def train_order(self, epoch: int) -> Tensor:
        """The sample indices of epoch `epoch`, in order: a pure function of (seed, epoch)."""
        n = self.info.num_train
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=_generator("order", self.seed, int(epoch)))

    # -------------------------------------------------------- batches
    def train_batches(self, epoch: int, start_batch: int = 0, replica: int = 0,
                      replicas: int = 1) -> Iterator[TensorPair]:
        """Batches `start_batch`, ... of `epoch`; with `replicas` > 1, replica `replica`'s
        contiguous share of each (:func:`shard_rows`): every replica orders the epoch the same
        way, so what it sees is a pure function of (seed, epoch, batch, replica)."""
        steps = self.steps_per_epoch()
        if not 0 <= start_batch <= steps:
            raise FrzooError(f"start_batch={start_batch} is outside 0..{steps} (batches per "
                             f"epoch); the checkpoint does not match this data configuration.")
        order = self.train_order(epoch).tolist()
        bs = self.batch_size
        batches = [order[i * bs:(i + 1) * bs] for i in range(start_batch, steps)]
        shards = [shard_rows(len(b), replica, replicas) for b in batches]
        return self._iterate(self.train_set, [b[lo:hi] for b, (lo, hi) in zip(batches, shards)],
                             epoch=int(epoch), first=start_batch, train=True,
                             rows=[(lo, len(b)) for b, (lo, _) in zip(batches, shards)])

    def test_batches(self, replica: int = 0, replicas: int = 1) -> Iterator[TensorPair]:
        """The test set in batches; with `replicas` > 1, replica `replica` takes every
        `replicas`-th batch from its own index (whole batches: none is split)."""
        n, bs = self.info.num_test, self.eval_batch_size
        batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        return self._iterate(self.test_set, batches[replica::replicas], epoch=-1, first=0,
                             train=False)

    def _iterate(self, dataset: Dataset, batches: List[List[int]], *, epoch: int, first: int,
                 train: bool, rows: Optional[List[Tuple[int, int]]] = None
                 ) -> Iterator[TensorPair]:
        if not batches:
            return
        collate = _collate_tensor if isinstance(dataset, TensorDataset) else default_collate
        # Our own generator: DataLoader otherwise draws its worker base seed from the global RNG,
        # which would make model randomness depend on data loading.
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=collate, generator=_generator("loader", self.seed, epoch))
        batch_iter = iter(loader)
        message = None
        try:
            for index, (x, y) in enumerate(batch_iter, start=first):
                yield self._prepare(x, y, epoch, index, train,
                                    None if rows is None else rows[index - first])
        except FrzooError as exc:  # maybe raised in a worker: keep the user's one-line message
            message = worker_message(str(exc))
            # The re-raised worker error sits in a reference cycle with DataLoader frames that
            # hold the iterator; left to the cycle collector, worker shutdown then waits 5 s per
            # worker. Clearing the finished frames lets the workers exit now.
            traceback.clear_frames(exc.__traceback__)
        finally:
            del batch_iter
        if message is not None:
            raise FrzooError(message)

    def _prepare(self, x: Tensor, y: Tensor, epoch: int, index: int, train: bool,
                 rows: Optional[Tuple[int, int]] = None) -> TensorPair:
        x = to_unit(x)
        size = self.info.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = resize_images(x, size)
        if train and self.augment != "none":
            x = augment_batch(x, self.augment, _generator("augment", self.seed, epoch, index),
                              rows=rows)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous(), torch.as_tensor(y).long()


def worker_message(msg: str) -> str:
    """The original message of a FrzooError re-raised from a DataLoader worker (whose text is the
    worker's whole traceback): the user gets the one line the data set wrote."""
    if "Original Traceback" not in msg:
        return msg
    for line in reversed(msg.strip().splitlines()):
        if "FrzooError: " in line:
            return line.split("FrzooError: ", 1)[1]
    return msg.strip().splitlines()[-1]
