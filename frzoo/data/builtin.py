"""The built-in data sets that need no file of the user's: CIFAR-10/100 (torchvision),
scikit-learn's digits and a synthetic set. Each is registered through the public :func:`frzoo.register_dataset`
and returns :class:`DatasetSplits`, exactly as a plugin's data set does (see :mod:`frzoo.data`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from omegaconf import DictConfig

from ..errors import FrzooError
from ..plugins import register_dataset
from .sets import DatasetSplits, TensorPair, resize_images

# Per-pixel statistics as used by the Features Replay authors' code (0..255 units / 255).
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
DIGITS_SIZE = 32
SYNTHETIC_SIZE = 32


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
    x = resize_images(x, int(cfg.get("image_size") or DIGITS_SIZE))
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
