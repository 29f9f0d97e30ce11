"""From a registered builder's output to a :class:`DataModule`: the checks, resizing, limits and
statistics every data set goes through, built-in or a plugin's (see :mod:`frzoo.data`)."""
from __future__ import annotations

import traceback
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import FrzooError
from ..plugins import DATASETS
from .module import DataModule, worker_message
from .sets import (MAX_CLASSES, DataInfo, DatasetSplits, Split, TensorDataset, TensorPair,
                   first_nonfinite_row, resize_images, to_unit)

# Mean/std of Dataset-backed (not in-memory) training sets come from this many evenly spaced
# samples: decoding a whole image folder just for statistics would be slow.
STATS_SAMPLES = 1024


def _tensor_stats(x: Tensor, chunk: int = 4096) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, x.shape[0], chunk):
        part = to_unit(x[start:start + chunk]).double()
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
    if x.is_floating_point():
        row = first_nonfinite_row(x)
        if row is not None:
            raise FrzooError(f"{where}: image {row} holds NaN or infinite pixels; every pixel "
                             f"must be a finite value in [0, 1]. Fix or drop that image.")
    if x.dtype != torch.uint8 and x.dtype != torch.float32:
        x = x.float()
    return x, y.long()


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
        x = resize_images(x, size)
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
            xs.append(resize_images(x, size))
    except FrzooError as exc:  # see DataModule._iterate for why the frames are cleared
        message = worker_message(str(exc))
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
    _check_labels(name, splits.num_classes, train, test)
    channels, size = _image_shape(name, train, test, size)
    num_workers = int(cfg.get("num_workers") or 0)
    if splits.mean is not None and splits.std is not None:
        mean, std = tuple(map(float, splits.mean)), tuple(map(float, splits.std))
    elif train_full is not None:
        mean, std = _tensor_stats(train_full)
    else:
        full = splits.train if isinstance(splits.train, Dataset) else train
        mean, std = _dataset_stats(full, size, num_workers)
    if len(mean) != channels or len(std) != channels:
        raise FrzooError(f"dataset '{name}': mean/std have {len(mean)}/{len(std)} values for "
                         f"{channels} channels; give one per channel.")
    info = DataInfo(num_classes=int(splits.num_classes), channels=channels, image_size=size,
                    num_train=len(train), num_test=len(test),  # type: ignore[arg-type]
                    mean=mean, std=std, name=name)
    return DataModule(train, test, info, seed=seed, batch_size=int(cfg.batch_size),
                      eval_batch_size=cfg.get("eval_batch_size"), augment=str(cfg.augment),
                      normalize=bool(cfg.normalize), shuffle=bool(cfg.shuffle),
                      num_workers=num_workers, drop_last=bool(cfg.drop_last))


def _check_labels(name: str, num_classes: Any, train: Dataset, test: Dataset) -> None:
    """A sane class count, and in-memory labels inside it: a stray huge label would otherwise
    become a classifier head of that many outputs (a label of 2e9: hundreds of GB)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 1 <= num_classes <= MAX_CLASSES:
        raise FrzooError(f"dataset '{name}' declares num_classes={num_classes!r}; it must be an "
                         f"integer in 1..{MAX_CLASSES} (the classifier head has one output per "
                         f"class). Check the builder's labels.")
    for split_name, ds in (("train", train), ("test", test)):
        if isinstance(ds, TensorDataset):
            lo, hi = int(ds.y.min()), int(ds.y.max())
            if lo < 0 or hi >= num_classes:
                row = int(((ds.y < 0) | (ds.y >= num_classes)).nonzero()[0, 0])
                raise FrzooError(f"dataset '{name}' ({split_name}): labels span {lo}..{hi} but "
                                 f"num_classes={num_classes} (sample {row} has label "
                                 f"{int(ds.y[row])}); labels must be 0..num_classes-1.")


def _image_shape(name: str, train: Dataset, test: Dataset, size: Optional[int]) -> Tuple[int, int]:
    """(channels, square side after resize) of the training images; the test images must have
    the same channels, and images that are not square need ``data.image_size``."""
    if isinstance(train, TensorDataset):
        channels, h, w = train.x.shape[1:]
    else:
        channels, h, w = _first_image(name, train).shape
    if h != w and size is None:
        raise FrzooError(f"dataset '{name}' has {h}x{w} images, which are not square; set "
                         f"data.image_size to resize them to a square side.")
    if isinstance(test, TensorDataset) and test.x.shape[1] != channels:
        raise FrzooError(f"dataset '{name}': training images have {channels} channels but test "
                         f"images have {test.x.shape[1]}; both splits need the same channels.")
    return int(channels), int(size or h)
