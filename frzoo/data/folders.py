"""The ``imagefolder`` data set: ``root/train/<class>/*`` and ``root/val`` (or ``root/test``),
decoded by DataLoader workers. Registered through the public :func:`frzoo.register_dataset`, as
a plugin's data set is. Its pixels are PIL's uint8 and its labels the training folder's class
indices, so no value can be out of range; what can go wrong is a missing folder, a test class the
training folder lacks, or an unreadable file, and each gets a message naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torchvision.transforms as T
from omegaconf import DictConfig
from torchvision.datasets import ImageFolder

from ..errors import FrzooError
from ..plugins import register_dataset
from .sets import DatasetSplits

IMAGEFOLDER_SIZE = 32


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
