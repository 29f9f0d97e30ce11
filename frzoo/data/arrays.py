"""The ``npz`` data set: numpy arrays in a file, checked on load so that a bad value is named with
its file, array, row and rule instead of surfacing as a torch error mid-training (a NaN pixel as
a NaN loss at step 0, a stray label of 2e9 as a 2e9-way classifier head). Registered through the
public :func:`frzoo.register_dataset`, as a plugin's data set is.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from ..errors import FrzooError
from ..plugins import register_dataset
from .sets import MAX_CLASSES, DatasetSplits, TensorPair, first_nonfinite_row

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
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        row = first_nonfinite_row(images)  # after float32: a huge float64 pixel is inf there
        if row is not None:
            raise FrzooError(f"{where}: image x[{row}] holds NaN or infinite pixels; every pixel "
                             f"must be finite (float images in [0, 1]). Fix or drop that image.")
        return images
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
        integral = np.isfinite(y) & (y == np.round(y))
        if not np.all(integral):
            row = int(np.flatnonzero(~integral)[0])
            raise FrzooError(f"{where}: y holds non-integer labels (dtype {y.dtype}, e.g. "
                             f"y[{row}] = {y[row]}); labels must be class indices 0..C-1. "
                             f"Convert them to integers.")
    elif not np.issubdtype(y.dtype, np.integer):
        raise FrzooError(f"{where}: y has dtype {y.dtype}, not integer labels; labels must be "
                         f"class indices 0..C-1. Map them to integers.")
    if y.min() < 0:
        row = int(np.argmin(y))
        raise FrzooError(f"{where}: y holds negative labels (y[{row}] = {y[row]}); labels must "
                         f"be class indices 0..C-1. Shift or remap them.")
    if y.max() >= MAX_CLASSES:
        row = int(np.argmax(y))
        raise FrzooError(f"{where}: label y[{row}] = {y[row]:.0f}; labels are class indices "
                         f"0..C-1 with C = the largest label + 1, at most {MAX_CLASSES} (the "
                         f"classifier head has one output per class). Remap the labels to 0..C-1.")
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
