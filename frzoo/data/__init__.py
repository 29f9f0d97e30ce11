"""Data: deterministic batching, and the data sets it batches.

The package is in layers, each module one job:

* :mod:`frzoo.data.module`: :class:`DataModule`, which only orders, shards, augments and batches
  (every random choice a pure function of ``(seed, epoch[, batch])``, so runs resume bit for bit);
* :mod:`frzoo.data.build`: :func:`build_data`, from a registered builder's output to a
  ``DataModule`` (the checks, resizing, limits and statistics every data set goes through);
* :mod:`frzoo.data.sets`: what a builder returns (:class:`DatasetSplits`) and what the run knows
  of the result (:class:`DataInfo`);
* the built-in data sets, registered through the public :func:`frzoo.register_dataset` exactly
  as a plugin's are: :mod:`frzoo.data.builtin` (``cifar10``, ``cifar100``, ``digits``,
  ``synthetic``), :mod:`frzoo.data.arrays` (``npz``), :mod:`frzoo.data.folders` (``imagefolder``).

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
that ``num_classes`` is at most :data:`MAX_CLASSES`, that in-memory labels lie in
``0..num_classes-1`` and that in-memory float pixels are finite, and batches. Raise
:class:`frzoo.FrzooError` for bad input, naming the file, the problem and the fix.

Built-in data sets: ``cifar10``, ``cifar100`` (torchvision loaders, authors' mean/std),
``digits`` (scikit-learn's 8x8 digits, fixed 80/20 split, upsampled to 32), ``npz``,
``imagefolder`` (``root/train`` + ``root/val`` or ``root/test``, resized to 32 by default, RGB)
and ``synthetic`` (class-dependent patterns plus noise, from a fixed generator).
"""
from .build import build_data
from .module import (AUGMENTS, CROP_PADDING, DataModule, augment_batch, derive_seed,
                     last_batch_rows, shard_rows)
from .sets import MAX_CLASSES, DataInfo, DatasetSplits
# The built-in data sets register themselves on import, as a plugin's modules do.
from . import arrays, builtin, folders  # noqa: F401
from .builtin import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

__all__ = ["AUGMENTS", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "CROP_PADDING", "MAX_CLASSES", "DataInfo", "DataModule", "DatasetSplits",
           "augment_batch", "build_data", "derive_seed", "last_batch_rows",
           "shard_rows"]
