"""What a data set is to frzoo: the splits a builder returns, the facts the run needs about them,
and the two image operations both the builders and the batches use (resize, 0..1 units).

A builder (built-in or a plugin's, see :mod:`frzoo.data`) returns :class:`DatasetSplits`; frzoo
turns it into :class:`DataInfo` and the datasets a :class:`frzoo.data.module.DataModule` batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

# The most classes a data set may have: a bound far above any real classification set
# (ImageNet-21k has 21841) that stops a stray label from sizing the classifier head.
MAX_CLASSES = 100_000

TensorPair = Tuple[Tensor, Tensor]
Split = Union[TensorPair, Dataset]


@dataclass(frozen=True)
class DataInfo:
    """What the run needs to know about a built data set (the model's head and stem, the
    normalization, the epoch length)."""
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
    """What a dataset builder returns; see :mod:`frzoo.data` for the rules each split follows."""
    train: Split
    test: Split
    num_classes: int
    mean: Optional[Sequence[float]] = None  # known constants; None = computed from train
    std: Optional[Sequence[float]] = None


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


def resize_images(x: Tensor, size: int, chunk: int = 4096) -> Tensor:
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


def to_unit(x: Tensor) -> Tensor:
    """Images as float in [0, 1] units (uint8 0..255 is divided by 255)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def first_nonfinite_row(x: Tensor, chunk: int = 4096) -> Optional[int]:
    """The index of the first image holding a NaN or infinite pixel, or None. One such pixel
    turns the first step's loss into NaN, which reads like a learning rate that is too high."""
    if not x.is_floating_point():
        return None
    for start in range(0, x.shape[0], chunk):
        bad = ~torch.isfinite(x[start:start + chunk]).flatten(1).all(dim=1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
    return None
