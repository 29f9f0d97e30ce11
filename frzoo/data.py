"""Data sets, deterministic batching and batch augmentation.

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

Writing a data set (plugins)
----------------------------
Register a builder with :func:`frzoo.register_dataset`::

    @register_dataset("my_set")
    def my_set(cfg: DictConfig) -> DatasetSplits:
        ...
        return DatasetSplits(train=(train_x, train_y), test=(test_x, test_y), num_classes=10)

``cfg`` is the recipe's ``data`` section (read ``cfg.root``, ``cfg.path``, ``cfg.image_size`` ...
as you need). The builder gets no run seed on purpose: a data set's content and its train/test
split must be the same for every run. It returns a :class:`DatasetSplits` (or the plain tuple
``(train_x, train_y, test_x, test_y, num_classes)``) where each split is either

* in-memory tensors ``(x, y)``: ``x`` of shape ``(N, C, H, W)``, ``uint8`` in 0..255 or floating
  point in [0, 1]; ``y`` integer labels of shape ``(N,)`` in ``0..num_classes-1``; or
* a ``torch.utils.data.Dataset`` whose items are ``(image, label)`` with ``image`` a ``(C, H, W)``
  tensor (``uint8`` or float in [0, 1]) of one fixed size and ``label`` an int. Use this for data
  that does not fit in memory; ``data.num_workers`` then decodes in parallel.

frzoo then resizes to ``data.image_size`` when set (bilinear; otherwise the images' own size,
which must be square), computes mean/std from the whole training set unless the builder gives
``mean``/``std`` (Dataset splits: from at most 1024 evenly spaced samples), applies
``data.limit_train``/``data.limit_test`` (the first N samples, in the builder's order), checks
labels against ``num_classes``, and batches. Raise :class:`frzoo.FrzooError` for bad input,
naming the file, the problem and the fix.

Built-in data sets: ``cifar10``, ``cifar100`` (torchvision loaders, authors' mean/std),
``digits`` (scikit-learn's 8x8 digits, fixed 80/20 split, upsampled to 32), ``npz``,
``imagefolder`` (``root/train`` + ``root/val`` or ``root/test``, resized to 32 by default, RGB)
and ``synthetic`` (class-dependent patterns plus noise, from a fixed generator).
"""
from __future__ import annotations

import hashlib
import math
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms as T
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder

from .errors import FrzooError
from .plugins import DATASETS, register_dataset

AUGMENTS = ("standard", "crop", "none")
CROP_PADDING = 4
# Per-pixel statistics as used by the Features Replay authors' code (0..255 units / 255).
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
DIGITS_SIZE = 32
IMAGEFOLDER_SIZE = 32
SYNTHETIC_SIZE = 32
# Mean/std of Dataset-backed (not in-memory) training sets come from this many evenly spaced
# samples: decoding a whole image folder just for statistics would be slow.
STATS_SAMPLES = 1024

TensorPair = Tuple[Tensor, Tensor]
Split = Union[TensorPair, Dataset]


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    channels: int
    image_size: int  # square side after resize
    num_train: int
    num_test: int
    mean: Tuple[float, ...]  # per channel, in [0,1] units
    std: Tuple[float, ...]
    name: str = ""  # the data set's registered name, for messages


@dataclass
class DatasetSplits:
    """What a dataset builder returns; see the module docstring."""
    train: Split
    test: Split
    num_classes: int
    mean: Optional[Sequence[float]] = None  # known constants; None = computed from train
    std: Optional[Sequence[float]] = None


# ---------------------------------------------------------------- determinism helpers
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and platforms."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


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


# ---------------------------------------------------------------- sources
class TensorDataset(Dataset):
    """In-memory (x, y) whose batched fetch is one indexing op (no per-sample collate)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> TensorPair:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: List[int]) -> TensorPair:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def _collate_tensor(batch: TensorPair) -> TensorPair:
    return batch


def _resize(x: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Bilinear resize to (size, size); uint8 stays uint8 (rounded) to keep memory low."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    down = size < max(x.shape[-2:])
    outs = []
    for start in range(0, x.shape[0], chunk):
        part = F.interpolate(x[start:start + chunk].float(), size=(size, size), mode="bilinear",
                             align_corners=False, antialias=down)
        if x.dtype == torch.uint8:
            part = part.round_().clamp_(0, 255).to(torch.uint8)
        outs.append(part)
    if not outs:
        return torch.empty((0, x.shape[1], size, size), dtype=x.dtype if x.dtype == torch.uint8
                           else torch.float32)
    return torch.cat(outs)


def _to_unit(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _tensor_stats(x: Tensor, chunk: int = 4096) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, x.shape[0], chunk):
        part = _to_unit(x[start:start + chunk]).double()
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    mean = total / max(count, 1)
    var = (total_sq / max(count, 1) - mean * mean).clamp_min(0)
    std = var.sqrt()
    # A constant channel would divide by zero; leave it unscaled instead.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_pair(where: str, x: Any, y: Any) -> TensorPair:
    """Validates a builder's in-memory split; errors name the builder and the rule."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise FrzooError(f"{where}: images and labels must be torch tensors, got "
                         f"{type(x).__name__} and {type(y).__name__}. Convert with torch.as_tensor.")
    if x.ndim != 4:
        raise FrzooError(f"{where}: images have shape {tuple(x.shape)}; expected (N, C, H, W).")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise FrzooError(f"{where}: images have dtype {x.dtype}; use uint8 (0..255) or float "
                         f"in [0, 1].")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise FrzooError(f"{where}: labels have shape {tuple(y.shape)} for {x.shape[0]} images; "
                         f"expected ({x.shape[0]},).")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise FrzooError(f"{where}: labels have dtype {y.dtype}; expected integer class indices.")
    if x.dtype != torch.uint8 and x.dtype != torch.float32:
        x = x.float()
    return x, y.long()


# ---------------------------------------------------------------- the data module
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
        return 0 if self.drop_last else self.info.num_train % self.batch_size

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
            message = _worker_message(str(exc))
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
        x = _to_unit(x)
        size = self.info.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = _resize(x, size)
        if train and self.augment != "none":
            x = augment_batch(x, self.augment, _generator("augment", self.seed, epoch, index),
                              rows=rows)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous(), torch.as_tensor(y).long()


def _worker_message(msg: str) -> str:
    """The original message of a FrzooError re-raised from a DataLoader worker."""
    if "Original Traceback" not in msg:
        return msg
    for line in reversed(msg.strip().splitlines()):
        if "FrzooError: " in line:
            return line.split("FrzooError: ", 1)[1]
    return msg.strip().splitlines()[-1]


# ---------------------------------------------------------------- build
def _as_splits(name: str, out: Any) -> DatasetSplits:
    if isinstance(out, DatasetSplits):
        return out
    if isinstance(out, tuple) and len(out) == 5:
        return DatasetSplits(train=(out[0], out[1]), test=(out[2], out[3]), num_classes=int(out[4]))
    raise FrzooError(f"dataset builder '{name}' returned {type(out).__name__}; it must return "
                     f"frzoo.data.DatasetSplits or (train_x, train_y, test_x, test_y, num_classes).")


def _prepare_split(where: str, split: Split, limit: Optional[int],
                   size: Optional[int]) -> Tuple[Dataset, Optional[Tensor]]:
    """(dataset, full in-memory x or None); tensors are limited and resized here, once."""
    if isinstance(split, Dataset) and not isinstance(split, TensorDataset):
        if limit is not None and limit < len(split):  # type: ignore[arg-type]
            split = Subset(split, range(limit))
        return split, None
    if isinstance(split, TensorDataset):
        split = (split.x, split.y)
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise FrzooError(f"{where}: a split must be (x, y) tensors or a torch Dataset, got "
                         f"{type(split).__name__}.")
    x, y = _check_pair(where, *split)
    if size is not None:
        x = _resize(x, size)
    full_x = x
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(x, y), full_x


def _dataset_stats(ds: Dataset, size: int, num_workers: int
                   ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    n = len(ds)  # type: ignore[arg-type]
    picks = sorted(set(np.linspace(0, n - 1, num=min(n, STATS_SAMPLES)).round().astype(int)))
    loader = DataLoader(Subset(ds, picks), batch_size=256, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    xs = []
    message = None
    try:
        for x, _ in loader:
            xs.append(_resize(x, size))
    except FrzooError as exc:  # see DataModule._iterate for why the frames are cleared
        message = _worker_message(str(exc))
        traceback.clear_frames(exc.__traceback__)
    if message is not None:
        raise FrzooError(message)
    return _tensor_stats(torch.cat(xs))


def _first_image(name: str, ds: Dataset) -> Tensor:
    try:
        x = ds[0][0]
    except FrzooError:
        raise
    except Exception as exc:
        raise FrzooError(f"dataset '{name}': reading the first training sample failed "
                         f"({type(exc).__name__}: {exc}).") from exc
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise FrzooError(f"dataset '{name}': items must be (image, label) with image a (C, H, W) "
                         f"tensor; "
                         f"got {type(x).__name__} of shape {getattr(x, 'shape', '?')}.")
    return x


def build_data(cfg: DictConfig, seed: int) -> DataModule:
    """Builds the data set named by ``cfg.name`` (the recipe's ``data`` section)."""
    name = str(cfg.name)
    builder: Callable[[DictConfig], Any] = DATASETS.get(name)
    splits = _as_splits(name, builder(cfg))
    size = cfg.get("image_size")
    train, train_full = _prepare_split(f"dataset '{name}' (train)", splits.train,
                                       cfg.get("limit_train"), size)
    test, _ = _prepare_split(f"dataset '{name}' (test)", splits.test,
                             cfg.get("limit_test"), size)
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise FrzooError(f"dataset '{name}' has {len(train)} training and {len(test)} test "  # type: ignore[arg-type]
                         f"samples; both must be non-empty.")
    for split_name, ds in (("train", train), ("test", test)):
        if isinstance(ds, TensorDataset):
            lo, hi = int(ds.y.min()), int(ds.y.max())
            if lo < 0 or hi >= splits.num_classes:
                raise FrzooError(f"dataset '{name}' ({split_name}): labels span {lo}..{hi} but "
                                 f"num_classes={splits.num_classes}; labels must be 0..num_classes-1.")
    num_workers = int(cfg.get("num_workers") or 0)
    if isinstance(train, TensorDataset):
        channels, h, w = train.x.shape[1:]
        ref = train_full
    else:
        channels, h, w = _first_image(name, train).shape
        ref = None
    if h != w and size is None:
        raise FrzooError(f"dataset '{name}' has {h}x{w} images, which are not square; set "
                         f"data.image_size to resize them to a square side.")
    size = int(size or h)
    if isinstance(test, TensorDataset) and test.x.shape[1] != channels:
        raise FrzooError(f"dataset '{name}': training images have {channels} channels but test "
                         f"images have {test.x.shape[1]}; both splits need the same channels.")
    if splits.mean is not None and splits.std is not None:
        mean, std = tuple(map(float, splits.mean)), tuple(map(float, splits.std))
    elif ref is not None:
        mean, std = _tensor_stats(ref)
    else:
        full = splits.train if isinstance(splits.train, Dataset) else train
        mean, std = _dataset_stats(full, size, num_workers)
    if len(mean) != channels or len(std) != channels:
        raise FrzooError(f"dataset '{name}': mean/std have {len(mean)}/{len(std)} values for "
                         f"{channels} channels; give one per channel.")
    info = DataInfo(num_classes=int(splits.num_classes), channels=int(channels), image_size=size,
                    num_train=len(train), num_test=len(test),  # type: ignore[arg-type]
                    mean=mean, std=std, name=name)
    return DataModule(train, test, info, seed=seed, batch_size=int(cfg.batch_size),
                      eval_batch_size=cfg.get("eval_batch_size"), augment=str(cfg.augment),
                      normalize=bool(cfg.normalize), shuffle=bool(cfg.shuffle),
                      num_workers=num_workers, drop_last=bool(cfg.drop_last))


# ---------------------------------------------------------------- built-in data sets
def _cifar(cfg: DictConfig, cls_name: str, label: str, mean: Tuple[float, ...],
           std: Tuple[float, ...]) -> DatasetSplits:
    cls = getattr(tvd, cls_name)
    root = Path(str(cfg.root)).expanduser()
    folder = root / cls.base_folder
    if not cfg.download and not folder.is_dir():
        raise FrzooError(
            f"{label} not found: looked in '{folder}' (data.root='{cfg.root}'). Set "
            f"data.download=true to download it, or point data.root at the folder that holds "
            f"{cls.base_folder}.")
    out = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=bool(cfg.download))
        except RuntimeError:
            raise FrzooError(
                f"{label} files in '{folder}' are missing or corrupted (torchvision's checksum "
                f"check failed). Delete the folder "
                f"and set data.download=true, or point data.root at a complete copy of "
                f"{cls.base_folder}.") from None
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise FrzooError(
                f"downloading {label} into '{root}' failed ({type(exc).__name__}: {exc}). Check "
                f"the network, or fetch {cls.url} by hand and extract it into data.root.") from None
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append((x, torch.as_tensor(ds.targets, dtype=torch.long)))
    return DatasetSplits(train=out[0], test=out[1], num_classes=len(ds.classes), mean=mean, std=std)


@register_dataset("cifar10")
def cifar10(cfg: DictConfig) -> DatasetSplits:
    """CIFAR-10 through torchvision (``root/cifar-10-batches-py``)."""
    return _cifar(cfg, "CIFAR10", "CIFAR-10", CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100")
def cifar100(cfg: DictConfig) -> DatasetSplits:
    """CIFAR-100 (fine labels) through torchvision (``root/cifar-100-python``)."""
    return _cifar(cfg, "CIFAR100", "CIFAR-100", CIFAR100_MEAN, CIFAR100_STD)


@register_dataset("digits")
def digits(cfg: DictConfig) -> DatasetSplits:
    """scikit-learn's 1797 8x8 digits: real data with no network. Split 80/20 with a fixed seed
    (not the run's) so every run evaluates on the same images; upsampled to 32 by default."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * x.shape[0])
    x = _resize(x, int(cfg.get("image_size") or DIGITS_SIZE))
    tr, te = perm[:n_train], perm[n_train:]
    return DatasetSplits(train=(x[tr], y[tr]), test=(x[te], y[te]), num_classes=10)


@register_dataset("synthetic")
def synthetic(cfg: DictConfig) -> DatasetSplits:
    """Learnable random images: a smooth per-class prototype plus noise, from fixed seeds, so
    tests and smoke runs need no files. Train and test use separate streams, so changing
    num_train leaves the test set as it is."""
    n_cls, channels = int(cfg.num_classes), int(cfg.channels)
    size = int(cfg.get("image_size") or SYNTHETIC_SIZE)
    coarse = torch.rand(n_cls, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int, stream: int) -> TensorPair:
        g = torch.Generator().manual_seed(stream)
        y = (torch.arange(n) % n_cls)[torch.randperm(n, generator=g)]
        noise = torch.randn(n, channels, size, size, generator=g) * 0.15
        return (protos[y] + noise).clamp_(0, 1), y

    return DatasetSplits(train=make(int(cfg.num_train), 1), test=make(int(cfg.num_test), 2),
                         num_classes=n_cls)


# ---------------------------------------------------------------- npz
_NPZ_HOW = "save it with numpy.savez(path, x=images, y=labels[, x_test=..., y_test=...])"


def _open_npz(path_str: str, key: str) -> Dict[str, np.ndarray]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FrzooError(f"npz file '{path_str}' (data.{key}) does not exist (resolved to "
                         f"{path.resolve()}). Point data.{key} at an existing .npz file.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise FrzooError(f"'{path_str}' (data.{key}) is not a valid .npz archive ({exc}); "
                         f"{_NPZ_HOW}.") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise FrzooError(f"'{path_str}' (data.{key}) is a single .npy array, not a .npz archive "
                         f"of named arrays; {_NPZ_HOW}.")
    try:
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise FrzooError(f"'{path_str}' (data.{key}) is not a valid .npz archive ({exc}); "
                         f"{_NPZ_HOW}.") from None


def _npz_images(where: str, x: np.ndarray) -> Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[3] in (1, 3):  # (N, H, W, C); also the guess when both ends could be C
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise FrzooError(f"{where}: x has shape {x.shape}; expected (N, H, W), (N, H, W, C) or "
                             f"(N, C, H, W) with C = 1 or 3 channels. Reshape the array.")
    else:
        raise FrzooError(f"{where}: x has {x.ndim} dimensions (shape {x.shape}); expected "
                         f"(N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3. Reshape the array.")
    if x.shape[0] == 0:
        raise FrzooError(f"{where}: x holds no images (shape {x.shape}); store at least one.")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise FrzooError(f"{where}: integer x has values in {x.min()}..{x.max()}; integer "
                             f"images must be 0..255. Save them as uint8 or as floats in [0, 1].")
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8)))
    if np.issubdtype(x.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise FrzooError(f"{where}: x has dtype {x.dtype}; use uint8 (0..255) or float in [0, 1].")


def _npz_labels(where: str, y: np.ndarray, n: int) -> Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise FrzooError(f"{where}: y has shape {y.shape}; expected one label per image, shape "
                         f"({n},). Store class indices, not one-hot rows (use argmax).")
    if y.shape[0] != n:
        raise FrzooError(f"{where}: x has {n} images but y has {y.shape[0]} labels; they must "
                         f"have the same length.")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise FrzooError(f"{where}: y holds non-integer labels (dtype {y.dtype}, e.g. "
                             f"{y[~(np.isfinite(y) & (y == np.round(y)))][0]}); labels must be "
                             f"class indices 0..C-1. Convert them to integers.")
    elif not np.issubdtype(y.dtype, np.integer):
        raise FrzooError(f"{where}: y has dtype {y.dtype}, not integer labels; labels must be "
                         f"class indices 0..C-1. Map them to integers.")
    if y.min() < 0:
        raise FrzooError(f"{where}: y holds negative labels (min {y.min()}); labels must be class "
                         f"indices 0..C-1. Shift or remap them.")
    return torch.from_numpy(y.astype(np.int64))


def _npz_pair(file: str, key: str, arrays: Dict[str, np.ndarray], xk: str, yk: str) -> TensorPair:
    missing = [k for k in (xk, yk) if k not in arrays]
    if missing:
        raise FrzooError(f"npz file '{file}' (data.{key}) has no array {' or '.join(map(repr, missing))}"
                         f" (it has: {', '.join(sorted(arrays)) or 'nothing'}); {_NPZ_HOW}.")
    where = f"npz file '{file}' ({xk}, {yk})"
    x = _npz_images(where, arrays[xk])
    return x, _npz_labels(where, arrays[yk], x.shape[0])


@register_dataset("npz")
def npz(cfg: DictConfig) -> DatasetSplits:
    """Arrays ``x``, ``y`` (+ ``x_test``, ``y_test``) in ``data.path``, or the test arrays as
    ``x``, ``y`` in ``data.test_path``. Images (N,H,W), (N,H,W,C) or (N,C,H,W), C in {1, 3}."""
    if not cfg.get("path"):
        raise FrzooError("data.name=npz needs data.path: the .npz file with arrays x (images) and "
                         "y (labels). Set data.path=/path/to/file.npz.")
    path = str(cfg.path)
    arrays = _open_npz(path, "path")
    train = _npz_pair(path, "path", arrays, "x", "y")
    if cfg.get("test_path"):
        test_file = str(cfg.test_path)
        test_arrays = _open_npz(test_file, "test_path")
        # The test file's arrays are x, y; x_test, y_test are accepted too.
        xk, yk = ("x_test", "y_test") if "x" not in test_arrays and "x_test" in test_arrays \
            else ("x", "y")
        test = _npz_pair(test_file, "test_path", test_arrays, xk, yk)
    elif "x_test" in arrays or "y_test" in arrays:
        test = _npz_pair(path, "path", arrays, "x_test", "y_test")
    else:
        raise FrzooError(f"npz file '{path}' has no test arrays (it has: "
                         f"{', '.join(sorted(arrays))}) and data.test_path is not set. Add x_test "
                         f"and y_test to the file, or set data.test_path to a .npz with x and y.")
    if train[0].shape[1] != test[0].shape[1]:
        raise FrzooError(f"npz: training images have {train[0].shape[1]} channels but test images "
                         f"have {test[0].shape[1]}; save both with the same channels.")
    if train[0].shape[2:] != test[0].shape[2:] and not cfg.get("image_size"):
        raise FrzooError(f"npz: training images are {tuple(train[0].shape[2:])} but test images are "
                         f"{tuple(test[0].shape[2:])}; set data.image_size to resize both.")
    num_classes = int(max(int(train[1].max()), int(test[1].max())) + 1)
    return DatasetSplits(train=train, test=test, num_classes=num_classes)


# ---------------------------------------------------------------- imagefolder
def _load_rgb(path: str) -> Any:
    """PIL loader that turns an unreadable file into a FrzooError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise FrzooError(f"imagefolder: cannot read image '{path}' ({type(exc).__name__}: "
                         f"{str(exc).replace(repr(path), 'it')}). Delete or replace the file.") from None


class _ImageFolder(ImageFolder):
    """ImageFolder whose class indices can be fixed to the training folder's, so a test folder
    that lacks a class does not shift every label after it. Module level: workers pickle it."""

    def __init__(self, root: str, class_to_idx: Optional[Dict[str, int]], **kwargs: Any) -> None:
        self._fixed = class_to_idx
        super().__init__(root, **kwargs)

    def find_classes(self, directory: Any) -> Tuple[List[str], Dict[str, int]]:
        classes, found = super().find_classes(directory)
        if self._fixed is None:
            return classes, found
        extra = sorted(set(classes) - set(self._fixed))
        if extra:
            raise FrzooError(f"imagefolder: '{directory}' has class folders {extra} that the "
                             f"training folder lacks; every test class must exist in train.")
        return sorted(self._fixed, key=self._fixed.__getitem__), dict(self._fixed)


def _image_folder(root: Path, size: int, class_to_idx: Optional[Dict[str, int]]) -> _ImageFolder:
    transform = T.Compose([T.Resize((size, size)), T.PILToTensor()])
    try:
        return _ImageFolder(str(root), class_to_idx, transform=transform, loader=_load_rgb,
                            allow_empty=class_to_idx is not None)
    except FrzooError:
        raise
    except (FileNotFoundError, OSError) as exc:
        raise FrzooError(f"imagefolder: cannot use '{root}' ({exc}). It must hold one folder per "
                         f"class with images inside (root/train/<class>/*.png).") from None


@register_dataset("imagefolder")
def imagefolder(cfg: DictConfig) -> DatasetSplits:
    """``root/train/<class>/*`` and ``root/val`` (or ``root/test``); RGB, resized to
    data.image_size (32 when unset: image folders have no single native size)."""
    root = Path(str(cfg.root)).expanduser()
    size = int(cfg.get("image_size") or IMAGEFOLDER_SIZE)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise FrzooError(f"imagefolder: '{root}' (data.root) needs a 'train' folder and a 'val' or "
                         f"'test' folder, each with one sub-folder per class; found "
                         f"{sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such folder'}.")
    train = _image_folder(train_dir, size, None)
    test = _image_folder(test_dir, size, train.class_to_idx)
    return DatasetSplits(train=train, test=test, num_classes=len(train.classes))


__all__ = ["DataInfo", "DataModule", "DatasetSplits", "build_data", "augment_batch", "shard_rows",
           "derive_seed", "AUGMENTS", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD"]
