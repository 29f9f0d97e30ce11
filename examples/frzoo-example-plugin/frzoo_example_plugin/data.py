"""``example_stripes``: 4 classes of striped 16x16 RGB images, generated, no download.

A data set builder takes the recipe's ``data`` section and returns a ``DatasetSplits`` (see the
docstring of frzoo/data/__init__.py). It gets no run seed on purpose: the content and the train/test split
must be the same for every run, so the images come from a generator with a fixed seed. frzoo
then resizes (``data.image_size``), normalizes, applies ``data.limit_train``/``limit_test``,
shuffles and batches; the builder does none of that.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from frzoo import FrzooError, register_dataset
from frzoo.data import DatasetSplits

__all__ = ["example_stripes", "make_stripes", "NUM_CLASSES", "SIZE"]

NUM_CLASSES = 4  # horizontal, vertical, diagonal, anti-diagonal stripes
SIZE = 16
NUM_TRAIN, NUM_TEST = 256, 64


def make_stripes(n: int, generator: torch.Generator) -> tuple:
    """``n`` uint8 images (n, 3, 16, 16) and their labels: stripes of a random period, phase
    and colour, plus noise; the stripe direction is the class."""
    labels = torch.arange(n) % NUM_CLASSES
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    coords = torch.stack([yy, xx, yy + xx, yy - xx]).float()  # one direction per class
    period = 3 + 3 * torch.rand(n, 1, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    wave = torch.sin(2 * math.pi * coords[labels] / period + phase)  # (n, H, W) in [-1, 1]
    colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=generator)
    noise = 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    images = (0.5 + 0.4 * wave[:, None] * colour + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


@register_dataset("example_stripes")
def example_stripes(cfg: DictConfig) -> DatasetSplits:
    """256 training and 64 test images; reads no keys of ``cfg`` but refuses a path."""
    if cfg.get("path"):
        raise FrzooError(f"data.name=example_stripes generates its images; data.path="
                         f"{cfg.path!r} is not used. Remove data.path.")
    generator = torch.Generator().manual_seed(1234)  # fixed: same data for every run
    train_x, train_y = make_stripes(NUM_TRAIN, generator)
    test_x, test_y = make_stripes(NUM_TEST, generator)
    return DatasetSplits(train=(train_x, train_y), test=(test_x, test_y), num_classes=NUM_CLASSES)
