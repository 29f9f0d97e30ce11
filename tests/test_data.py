"""frzoo.data: the built-in data sets, error messages, and deterministic batching."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from omegaconf import DictConfig, OmegaConf

from frzoo.config import DataConfig
from frzoo.data import (CIFAR10_MEAN, CIFAR10_STD, DataInfo, DataModule, DatasetSplits,
                        augment_batch, build_data)
from frzoo.config import load_recipe
from frzoo.errors import FrzooError
from frzoo.plugins import register_dataset


def make_cfg(**overrides: Any) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)  # type: ignore[return-value]


def collect(batches: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def same(a: List[Tuple[torch.Tensor, torch.Tensor]], b: List[Tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


RAW = dict(augment="none", normalize=False, shuffle=False)


# ---------------------------------------------------------------- CIFAR (real torchvision loader)
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, obj: Dict[str, Any]) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[Path, Dict[str, Any]]:
    """A tiny CIFAR-10 in its own pickle format; the checksums the loader checks are the files'."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _images(rng, 6), rng.integers(0, 10, 6).tolist()
        _dump(folder / f"data_batch_{i}", {"batch_label": f"b{i}", "labels": y, "data": x,
                                            "filenames": [f"{i}_{j}.png" for j in range(6)]})
        train_x.append(x)
        train_y += y
    test_x, test_y = _images(rng, 10), rng.integers(0, 10, 10).tolist()
    _dump(folder / "test_batch", {"batch_label": "t", "labels": test_y, "data": test_x,
                                  "filenames": [f"t{j}.png" for j in range(10)]})
    _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)],
                                    "num_cases_per_batch": 6, "num_vis": 3072})
    cls = tvd.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                            for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, {"train_x": np.concatenate(train_x), "train_y": train_y,
                      "test_x": test_x, "test_y": test_y}


@pytest.fixture
def cifar100_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[Path, Dict[str, Any]]:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    arrays: Dict[str, Any] = {}
    for split, n in (("train", 30), ("test", 12)):
        x, y = _images(rng, n), rng.integers(0, 100, n).tolist()
        _dump(folder / split, {"filenames": [f"{j}.png" for j in range(n)], "batch_label": split,
                               "fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x})
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                            "coarse_label_names": [f"c{i}" for i in range(20)]})
    cls = tvd.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "meta")})
    return tmp_path, arrays


def _as_images(flat: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(flat.reshape(-1, 3, 32, 32)).float() / 255


def test_cifar10_round_trip(cifar10_root: Tuple[Path, Dict[str, Any]]) -> None:
    root, ref = cifar10_root
    dm = build_data(make_cfg(name="cifar10", root=str(root), batch_size=8, **RAW), seed=0)
    assert dm.info.num_classes == 10 and dm.info.channels == 3 and dm.info.image_size == 32
    assert (dm.info.num_train, dm.info.num_test) == (30, 10)
    assert dm.info.mean == CIFAR10_MEAN and dm.info.std == CIFAR10_STD
    train = collect(dm.train_batches(0))
    assert [x.shape[0] for x, _ in train] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([x for x, _ in train]), _as_images(ref["train_x"]))
    assert torch.cat([y for _, y in train]).tolist() == ref["train_y"]
    test = collect(dm.test_batches())  # eval_batch_size defaults to batch_size
    assert [x.shape[0] for x, _ in test] == [8, 2]
    assert torch.equal(torch.cat([x for x, _ in test]), _as_images(ref["test_x"]))
    assert torch.cat([y for _, y in test]).tolist() == ref["test_y"]


def test_cifar10_test_split_and_normalization(cifar10_root: Tuple[Path, Dict[str, Any]]) -> None:
    root, ref = cifar10_root
    dm = build_data(make_cfg(name="cifar10", root=str(root), batch_size=8, eval_batch_size=16,
                             augment="none", shuffle=False), seed=0)
    (x, y), = collect(dm.test_batches())
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (_as_images(ref["test_x"]) - mean) / std)
    assert y.tolist() == ref["test_y"]


def test_cifar10_with_a_stray_label_names_the_split_and_sample(
        cifar10_root: Tuple[Path, Dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged CIFAR file whose label would size a 2e9-way head is refused by the check every
    data set goes through, naming the sample."""
    root, ref = cifar10_root
    folder = root / "cifar-10-batches-py"
    labels = list(ref["test_y"])
    labels[4] = 2_000_000_000
    _dump(folder / "test_batch", {"batch_label": "t", "labels": labels, "data": ref["test_x"],
                                  "filenames": [f"t{j}.png" for j in range(10)]})
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    with pytest.raises(FrzooError, match=r"dataset 'cifar10' \(test\): labels span "
                                         r"\d\.\.2000000000 but num_classes=10 \(sample 4 has "
                                         r"label 2000000000\)"):
        build_data(make_cfg(name="cifar10", root=str(root), batch_size=8, **RAW), seed=0)


def test_cifar100_round_trip(cifar100_root: Tuple[Path, Dict[str, Any]]) -> None:
    root, ref = cifar100_root
    dm = build_data(make_cfg(name="cifar100", root=str(root), batch_size=64, **RAW), seed=3)
    assert dm.info.num_classes == 100 and (dm.info.num_train, dm.info.num_test) == (30, 12)
    (x, y), = collect(dm.train_batches(0))
    assert torch.equal(x, _as_images(ref["train_x"])) and y.tolist() == ref["train_y"]
    (x, y), = collect(dm.test_batches())
    assert torch.equal(x, _as_images(ref["test_x"])) and y.tolist() == ref["test_y"]


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_cifar_missing(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(FrzooError, match=re.escape(str(tmp_path / folder))) as info:
        build_data(make_cfg(name=name, root=str(tmp_path), download=False), seed=0)
    assert "data.download=true" in str(info.value) and "data.root" in str(info.value)


def test_cifar_corrupted(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty: the checksums fail
    with pytest.raises(FrzooError, match="missing or corrupted"):
        build_data(make_cfg(name="cifar10", root=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- digits
def test_digits() -> None:
    dm = build_data(make_cfg(name="digits", batch_size=500, **RAW), seed=0)
    info = dm.info
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, 32)
    assert info.num_train + info.num_test == 1797 and info.num_train == 1437
    x, y = next(iter(dm.train_batches(0)))
    assert x.shape == (500, 1, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    other = build_data(make_cfg(name="digits", batch_size=500, **RAW), seed=123)
    assert same(collect(dm.test_batches()), collect(other.test_batches()))
    assert same(collect(dm.train_batches(0)), collect(other.train_batches(0)))  # no shuffle
    small = build_data(make_cfg(name="digits", image_size=16), seed=0)
    assert small.info.image_size == 16 and next(iter(small.test_batches()))[0].shape[-1] == 16


# ---------------------------------------------------------------- npz
def _npz_cfg(path: Path, **kw: Any) -> DictConfig:
    return make_cfg(name="npz", path=str(path), batch_size=64, **RAW, **kw)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "nhwc1"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    c = 1 if layout in ("nhw", "nhwc1") else 3
    base = rng.integers(0, 256, size=(20, c, 8, 8), dtype=np.uint8)  # (N, C, H, W)
    stored = {"nhw": base[:, 0], "nhwc": base.transpose(0, 2, 3, 1),
              "nchw": base.astype(np.float32) / 255, "nhwc1": base.transpose(0, 2, 3, 1)}[layout]
    y = rng.integers(0, 4, 20)
    np.savez(tmp_path / "d.npz", x=stored[:15], y=y[:15], x_test=stored[15:], y_test=y[15:])
    dm = build_data(_npz_cfg(tmp_path / "d.npz"), seed=0)
    assert (dm.info.channels, dm.info.image_size, dm.info.num_classes) == (c, 8, int(y.max()) + 1)
    (x, yy), = collect(dm.train_batches(0))
    torch.testing.assert_close(x, torch.from_numpy(base[:15]).float() / 255)
    assert yy.tolist() == y[:15].tolist()
    (x, yy), = collect(dm.test_batches())
    torch.testing.assert_close(x, torch.from_numpy(base[15:]).float() / 255)


def test_npz_test_path_and_resize(tmp_path: Path) -> None:
    x = np.zeros((6, 10, 10), np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(6).reshape(6, 1))
    np.savez(tmp_path / "test.npz", x=x[:4], y=np.array([0.0, 1.0, 2.0, 5.0]))
    dm = build_data(_npz_cfg(tmp_path / "train.npz", test_path=str(tmp_path / "test.npz"),
                             image_size=12), seed=0)
    assert (dm.info.num_train, dm.info.num_test, dm.info.num_classes) == (6, 4, 6)
    assert next(iter(dm.test_batches()))[0].shape == (4, 1, 12, 12)


def _write(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


X = np.zeros((4, 8, 8), np.uint8)
Y = np.array([0, 1, 2, 3])
XF_NAN = np.zeros((4, 8, 8), np.float32)
XF_NAN[2, 3, 5] = np.nan  # one pixel of image 2


@pytest.mark.parametrize("arrays,match", [
    (dict(y=Y, x_test=X, y_test=Y), r"no array 'x' \(it has: x_test, y, y_test\)"),
    (dict(x=X, y=Y, x_test=X), r"no array 'y_test'"),
    (dict(x=np.zeros((4, 8)), y=Y, x_test=X, y_test=Y), r"x has 2 dimensions"),
    (dict(x=np.zeros((4, 5, 8, 8)), y=Y, x_test=X, y_test=Y), r"C = 1 or 3"),
    (dict(x=X, y=Y[:3], x_test=X, y_test=Y), r"4 images but y has 3 labels"),
    (dict(x=X, y=np.array([0, 1.5, 2, 3]), x_test=X, y_test=Y), r"non-integer labels"),
    (dict(x=X, y=np.array(["a", "b", "c", "d"]), x_test=X, y_test=Y), r"not integer labels"),
    (dict(x=X, y=np.array([0, -1, 2, 3]), x_test=X, y_test=Y), r"negative labels"),
    (dict(x=X, y=np.eye(4), x_test=X, y_test=Y), r"not one-hot"),
    (dict(x=X, y=Y), r"no test arrays .*data\.test_path"),
    (dict(x=XF_NAN, y=Y, x_test=X, y_test=Y), r"\(x, y\): image x\[2\] holds NaN or infinite"),
    (dict(x=X, y=Y, x_test=np.where(XF_NAN == XF_NAN, XF_NAN, np.inf), y_test=Y),
     r"\(x_test, y_test\): image x\[2\] holds NaN or infinite"),
    (dict(x=X, y=np.array([0, 1, 2_000_000_000, 3]), x_test=X, y_test=Y),
     r"label y\[2\] = 2000000000; .* at most 100000"),
    (dict(x=X, y=Y, x_test=X, y_test=np.array([0, 1, 2, 2e9])), r"label y\[3\] = 2000000000"),
    (dict(x=X, y=np.array([0, 1, np.nan, 3]), x_test=X, y_test=Y), r"y\[2\] = nan"),
])
def test_npz_errors(tmp_path: Path, arrays: Dict[str, Any], match: str) -> None:
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FrzooError, match=match) as info:
        build_data(_npz_cfg(path), seed=0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_npz_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FrzooError, match=r"does not exist.*data\.path"):
        build_data(_npz_cfg(tmp_path / "nope.npz"), seed=0)
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(FrzooError, match=r"junk\.npz.*not a valid \.npz"):
        build_data(_npz_cfg(tmp_path / "junk.npz"), seed=0)
    np.save(tmp_path / "arr.npy", X)
    with pytest.raises(FrzooError, match=r"single \.npy array"):
        build_data(_npz_cfg(tmp_path / "arr.npy"), seed=0)
    with pytest.raises(FrzooError, match=r"needs data\.path"):
        build_data(make_cfg(name="npz"), seed=0)
    good = _write(tmp_path / "good.npz", x=X, y=Y)
    with pytest.raises(FrzooError, match=r"missing\.npz.*data\.test_path"):
        build_data(_npz_cfg(good, test_path=str(tmp_path / "missing.npz")), seed=0)


# ---------------------------------------------------------------- imagefolder
def _png(path: Path, color: Tuple[int, int, int], size: Tuple[int, int] = (12, 10)) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", color)
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder(folder_root: Path, workers: int) -> None:
    dm = build_data(make_cfg(name="imagefolder", root=str(folder_root), batch_size=4,
                             num_workers=workers, **RAW), seed=0)
    assert (dm.info.num_classes, dm.info.channels, dm.info.image_size) == (2, 3, 32)
    assert (dm.info.num_train, dm.info.num_test) == (6, 4)
    x, y = map(torch.cat, zip(*collect(dm.train_batches(0))))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))  # cat is red
    assert torch.allclose(x[5, :, 5, 5], torch.tensor([0.0, 0.0, 1.0]))
    normalized = build_data(make_cfg(name="imagefolder", root=str(folder_root), image_size=8),
                            seed=0)
    assert normalized.info.image_size == 8 and normalized.info.mean == pytest.approx((0.5, 0, 0.5))


def test_imagefolder_val_missing_class_keeps_labels(folder_root: Path) -> None:
    import shutil
    shutil.rmtree(folder_root / "val" / "cat")
    dm = build_data(make_cfg(name="imagefolder", root=str(folder_root), **RAW), seed=0)
    assert torch.cat([y for _, y in dm.test_batches()]).tolist() == [1, 1]


def test_imagefolder_corrupt_found_at_build(folder_root: Path) -> None:
    bad = folder_root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")  # mean/std are computed from the training images
    with pytest.raises(FrzooError, match=re.escape(str(bad))) as info:
        build_data(make_cfg(name="imagefolder", root=str(folder_root)), seed=0)
    assert "\n" not in str(info.value) and "Delete or replace" in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_corrupt_while_training(folder_root: Path, workers: int) -> None:
    dm = build_data(make_cfg(name="imagefolder", root=str(folder_root), num_workers=workers,
                             batch_size=2), seed=0)
    bad = folder_root / "train" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG truncated")  # broken after the build: seen by a worker
    with pytest.raises(FrzooError, match=re.escape(str(bad))) as info:
        collect(dm.train_batches(0))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_imagefolder_layout_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FrzooError, match=r"'val' or 'test'"):
        build_data(make_cfg(name="imagefolder", root=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- synthetic, registry
def test_synthetic_deterministic() -> None:
    cfg = make_cfg(name="synthetic", num_train=64, num_test=16, channels=1, num_classes=4,
                   image_size=16, batch_size=16)
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=0)
    assert a.info == b.info and a.info.channels == 1 and a.info.image_size == 16
    assert same(collect(a.train_batches(0)), collect(b.train_batches(0)))
    assert same(collect(a.test_batches()), collect(b.test_batches()))
    # learnable: per-class means are far apart compared with the noise
    x, y = map(torch.cat, zip(*collect(build_data(make_cfg(**{**cfg, **RAW}), 0).train_batches(0))))
    centers = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert torch.cdist(centers.flatten(1), centers.flatten(1)).fill_diagonal_(1e9).min() > 1.0


def test_unknown_dataset() -> None:
    with pytest.raises(FrzooError, match=r"unknown dataset 'cifar1'.*cifar10"):
        build_data(make_cfg(name="cifar1"), seed=0)


def test_plugin_builder_tuple_and_label_check() -> None:
    @register_dataset("_test_tuple", override=True)
    def _tuple(cfg: DictConfig) -> Any:
        x = torch.rand(10, 3, 6, 6)
        return x, torch.arange(10) % 3, x[:4], torch.tensor([0, 1, 2, 2]), 3

    dm = build_data(make_cfg(name="_test_tuple"), seed=0)
    assert (dm.info.num_classes, dm.info.image_size, dm.info.num_train) == (3, 6, 10)

    @register_dataset("_test_bad_labels", override=True)
    def _bad(cfg: DictConfig) -> DatasetSplits:
        x = torch.rand(4, 3, 6, 6)
        return DatasetSplits(train=(x, torch.tensor([0, 1, 2, 7])), test=(x, torch.zeros(4, dtype=torch.long)),
                             num_classes=3)

    with pytest.raises(FrzooError, match=r"labels span 0\.\.7 but num_classes=3"):
        build_data(make_cfg(name="_test_bad_labels"), seed=0)


def test_plugin_builder_nonfinite_pixels_and_huge_num_classes() -> None:
    """Any builder's in-memory data is checked too: a NaN pixel names its split and row, a class
    count that would size an absurd classifier head is refused before any model is built."""
    x = torch.rand(5, 3, 6, 6)
    x[3, 1, 2, 2] = float("inf")
    y = torch.arange(5) % 2

    @register_dataset("_test_inf_pixel", override=True)
    def _inf(cfg: DictConfig) -> DatasetSplits:
        return DatasetSplits(train=(x, y), test=(x[:2], y[:2]), num_classes=2)

    with pytest.raises(FrzooError, match=r"'_test_inf_pixel' \(train\): image 3 holds NaN"):
        build_data(make_cfg(name="_test_inf_pixel"), seed=0)

    @register_dataset("_test_huge_classes", override=True)
    def _huge(cfg: DictConfig) -> DatasetSplits:
        return DatasetSplits(train=(x[:2], y[:2]), test=(x[:2], y[:2]), num_classes=2 * 10**9)

    with pytest.raises(FrzooError, match=r"num_classes=2000000000; .* 1\.\.100000"):
        build_data(make_cfg(name="_test_huge_classes"), seed=0)


# ---------------------------------------------------------------- determinism and batching
def _synth(**kw: Any) -> DataModule:
    base = dict(name="synthetic", num_train=100, num_test=30, image_size=8, batch_size=16)
    return build_data(make_cfg(**{**base, **kw}), seed=0)


def test_same_seed_same_batches_different_epoch_different_order() -> None:
    a, b = _synth(), _synth()
    assert same(collect(a.train_batches(2)), collect(b.train_batches(2)))
    assert not torch.equal(a.train_order(0), a.train_order(1))
    assert sorted(a.train_order(1).tolist()) == list(range(100))
    other_seed = build_data(make_cfg(name="synthetic", num_train=100, image_size=8), seed=1)
    assert not torch.equal(a.train_order(0), other_seed.train_order(0))
    assert torch.equal(_synth(shuffle=False).train_order(5), torch.arange(100))


def test_resume_from_start_batch_is_the_tail() -> None:
    dm = _synth()  # augment=standard: resumed batches must get the same crops and flips
    full = collect(dm.train_batches(3))
    assert len(full) == dm.steps_per_epoch() == 7
    assert same(collect(dm.train_batches(3, start_batch=4)), full[4:])
    assert collect(dm.train_batches(3, start_batch=7)) == []
    with pytest.raises(FrzooError, match="start_batch=8"):
        collect(dm.train_batches(3, start_batch=8))


def test_skipped_batches_are_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _synth(batch_size=10)
    fetched: List[int] = []
    real = type(dm.train_set).__getitems__
    monkeypatch.setattr(type(dm.train_set), "__getitems__",
                        lambda self, idx: (fetched.extend(idx), real(self, idx))[1])
    collect(dm.train_batches(0, start_batch=8))
    assert sorted(fetched) == sorted(dm.train_order(0)[80:].tolist())


def test_workers_do_not_change_batches() -> None:
    a, b = _synth(), _synth(num_workers=2)
    assert same(collect(a.train_batches(1)), collect(b.train_batches(1)))
    assert same(collect(a.test_batches()), collect(b.test_batches()))
    assert same(collect(a.train_batches(1, start_batch=5)), collect(b.train_batches(1, start_batch=5)))


def test_global_rng_untouched() -> None:
    dm = _synth(num_workers=0)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    collect(dm.train_batches(0))
    collect(dm.test_batches())
    assert torch.equal(state, torch.get_rng_state())


def test_augmentation_modes() -> None:
    plain = collect(_synth(augment="none").train_batches(0))
    aug = collect(_synth(augment="standard").train_batches(0))
    crop = collect(_synth(augment="crop").train_batches(0))
    for (xp, yp), (xa, ya), (xc, _) in zip(plain, aug, crop):
        assert torch.equal(yp, ya)
        assert not torch.equal(xp, xa) and not torch.equal(xp, xc)
    # the test set is never augmented
    assert same(collect(_synth(augment="standard").test_batches()),
                collect(_synth(augment="none").test_batches()))


def test_augment_batch_semantics() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x.repeat(50, 1, 1, 1), "crop", g)
    assert out.shape == (100, 1, 6, 6)
    # each crop is a window of the zero-padded image
    padded = torch.nn.functional.pad(x.repeat(50, 1, 1, 1), (4, 4, 4, 4))
    for i in range(0, 100, 7):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 6], out[i])]
        assert hits
    assert (out == 0).any()  # some crops show the black padding
    ones = torch.ones(64, 3, 8, 8)
    ones[:, :, :, :4] = 0.5  # left half darker: a flip is visible
    flipped = augment_batch(ones, "standard", torch.Generator().manual_seed(1), padding=0)
    n_flipped = int((flipped[:, 0, 0, 0] == 1).sum())
    assert 10 < n_flipped < 54
    assert torch.equal(augment_batch(ones, "none", torch.Generator()), ones)
    with pytest.raises(FrzooError, match="data.augment='blur' is not one of"):  # in the schema
        load_recipe(None, ["model.name=resnet18", "data.augment=blur"])


def test_drop_last_and_eval_batch_size() -> None:
    dm = _synth(batch_size=32, drop_last=True)
    batches = collect(dm.train_batches(0))
    assert dm.steps_per_epoch() == 3 and [x.shape[0] for x, _ in batches] == [32, 32, 32]
    keep = _synth(batch_size=32)
    assert keep.steps_per_epoch() == 4
    assert [x.shape[0] for x, _ in keep.train_batches(0)] == [32, 32, 32, 4]
    assert [x.shape[0] for x, _ in keep.test_batches()] == [30]
    assert [x.shape[0] for x, _ in _synth(eval_batch_size=8).test_batches()] == [8, 8, 8, 6]
    with pytest.raises(FrzooError, match=r"batch_size=200 .*drop_last"):
        _synth(batch_size=200, drop_last=True)


def test_limits() -> None:
    full = _synth(**RAW)
    small = _synth(limit_train=20, limit_test=5, **RAW)
    assert (small.info.num_train, small.info.num_test) == (20, 5)
    assert small.info.mean == full.info.mean  # statistics come from the whole training set
    xf = torch.cat([x for x, _ in full.train_batches(0)])
    xs = torch.cat([x for x, _ in small.train_batches(0)])
    assert torch.equal(xs, xf[:20])
    with pytest.raises(FrzooError, match="data.limit_train=0 must be positive"):  # the schema
        load_recipe(None, ["model.name=resnet18", "data.limit_train=0"])


def test_normalized_batches_are_standardized() -> None:
    dm = build_data(make_cfg(name="synthetic", num_train=256, augment="none", batch_size=256),
                    seed=0)
    x, _ = next(iter(dm.train_batches(0)))
    assert isinstance(dm.info, DataInfo)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)
