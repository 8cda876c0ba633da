"""Data loading: IDX parsing, CIFAR-10 layouts (tar, ImageFolder, torchvision batches), cache, errors."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_surgery.data import datasets as data
from robust_surgery.data.datasets import (
    CIFAR10_CLASSES,
    DATASETS,
    DataFormatError,
    DataNotFoundError,
    load_cifar10,
    load_dataset,
    load_mnist,
    read_idx,
    resolve_data_root,
)

MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture
def isolated(no_data):
    """Only what a test builds in tmp_path exists (tmp_path is the parent of the empty root)."""
    return no_data.parent


# ----------------------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = b"\x00\x00" + bytes([code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def fake_cifar(n_per_class: int, seed: int = 0):
    """uint8 images (10*n, 32, 32, 3) and labels; class c's images are constant-ish per class."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(10 * n_per_class, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), n_per_class)
    return imgs, labels


def png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def write_tree(folder: Path, imgs, labels, classes=CIFAR10_CLASSES) -> None:
    counters = {}
    for img, lab in zip(imgs, labels):
        d = folder / classes[lab]
        d.mkdir(parents=True, exist_ok=True)
        i = counters.get(lab, 0)
        counters[lab] = i + 1
        (d / f"{i:04d}.png").write_bytes(png_bytes(img))


def write_tar(path: Path, split: str, imgs, labels, classes=CIFAR10_CLASSES) -> None:
    # members deliberately in reverse class order: the loader must map names, not positions
    order = sorted(range(len(labels)), key=lambda i: (-labels[i], i))
    counters = {}
    with tarfile.open(path, "w:gz") as tf:
        for i in order:
            lab = int(labels[i])
            k = counters.get(lab, 0)
            counters[lab] = k + 1
            raw = png_bytes(imgs[i])
            info = tarfile.TarInfo(f"{split}/{classes[lab]}/{k:04d}.png")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


def interleaved(imgs, labels):
    """Expected loader order: round-robin over classes, file order within a class."""
    per = [np.flatnonzero(labels == c) for c in range(10)]
    order = [per[c][i] for i in range(max(map(len, per))) for c in range(10) if i < len(per[c])]
    return imgs[order], labels[order]


# ----------------------------------------------------------------------------- roots


def test_resolve_data_root_order(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.mkdir()  # an explicit root must exist (a typo is an error); the env's folders need not
    monkeypatch.setenv("ROBUST_SURGERY_DATA", os.pathsep.join([str(b), str(c)]))
    monkeypatch.setenv("ROBUST_SURGERY_CACHE", str(tmp_path / "cache"))
    roots = resolve_data_root(a)
    assert roots == [a, b, c, tmp_path / "cache" / "data"]
    assert data.cache_dir() == tmp_path / "cache"


def test_datasets_metadata():
    assert DATASETS["mnist"].input_shape == (1, 28, 28) and DATASETS["mnist"].num_classes == 10
    assert DATASETS["cifar10"].input_shape == (3, 32, 32)
    assert DATASETS["cifar10"].classes == CIFAR10_CLASSES and CIFAR10_CLASSES[0] == "airplane"


# ----------------------------------------------------------------------------- MNIST


def test_mnist_test_split_real(shared_data):
    x, y = load_mnist("test", root=shared_data)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_HIST
    # pixels are k/255 exactly
    assert torch.equal((x * 255).round() / 255, x)


def test_mnist_train_split_real(shared_data):
    x, y = load_mnist("train", root=shared_data)
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TRAIN_HIST
    assert y[:5].tolist() == [5, 0, 4, 1, 9]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_mnist_idx_gzip_or_plain(isolated, gz, layout):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    root = isolated / "root"
    write_mnist(root / "MNIST" / "raw" if layout == "torchvision" else root, "test", imgs, labels, gz)
    x, y = load_mnist("test", root=root)
    assert x.shape == (5, 1, 28, 28)
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(imgs))
    assert y.tolist() == [3, 1, 4, 1, 5]


def test_read_idx_shape_and_dtype(tmp_path):
    p = tmp_path / "x.idx"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p.write_bytes(gzip.compress(idx_bytes(arr)))  # gzip detected by content, not by name
    out = read_idx(p)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8 and (out == arr).all()


def test_corrupt_idx_truncated(isolated):
    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    root = isolated / "root"
    write_mnist(root, "test", imgs, np.zeros(4, dtype=np.uint8), gz=False)
    p = root / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="truncated or corrupt") as exc:
        load_mnist("test", root=root)
    assert str(p) in str(exc.value)


def test_corrupt_idx_bad_magic_and_swapped_files(isolated):
    root = isolated / "root"
    write_mnist(root, "test", np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8), gz=False)
    img = root / "t10k-images-idx3-ubyte"
    lab = root / "t10k-labels-idx1-ubyte"
    good_labels = lab.read_bytes()
    lab.write_bytes(b"\x12\x34" + good_labels[2:])
    with pytest.raises(DataFormatError, match="magic"):
        load_mnist("test", root=root)
    lab.write_bytes(img.read_bytes())  # an image file where the labels should be
    with pytest.raises(DataFormatError, match="expected 2049"):
        load_mnist("test", root=root)


def test_corrupt_gzip(isolated):
    root = isolated / "root"
    write_mnist(root, "test", np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8), gz=True)
    p = root / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(DataFormatError, match="corrupt gzip"):
        load_mnist("test", root=root)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_test_split_from_real_tar(shared_data):
    x, y = load_cifar10("test", root=shared_data)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and x.std() > 0.1
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert y[:20].tolist() == list(range(10)) * 2  # class-interleaved order
    # second load comes from the cache and is identical
    x2, y2 = load_cifar10("test", root=shared_data)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_cifar10_tar_pixels_and_class_names(isolated):
    imgs, labels = fake_cifar(3)
    root = isolated / "root"
    root.mkdir()
    write_tar(root / "cifar10-jpeg.tar.gz", "test", imgs, labels)
    x, y = load_cifar10("test", root=root)
    ex_imgs, ex_labels = interleaved(imgs, labels)
    assert y.tolist() == ex_labels.tolist()
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(ex_imgs).permute(0, 3, 1, 2))
    # the train split is not in this tar
    with pytest.raises(DataFormatError, match="no images"):
        load_cifar10("train", root=root)


def test_cifar10_tar_unknown_class_folder(isolated):
    imgs, labels = fake_cifar(1)
    root = isolated / "root"
    root.mkdir()
    bad = list(CIFAR10_CLASSES)
    bad[3] = "kitten"
    write_tar(root / "cifar10-jpeg.tar.gz", "test", imgs, labels, classes=bad)
    with pytest.raises(DataFormatError, match="'kitten' is not a CIFAR-10 class"):
        load_cifar10("test", root=root)


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_imagefolder_tree(isolated, nested):
    imgs, labels = fake_cifar(2, seed=3)
    root = isolated / "root"
    write_tree((root / "cifar10" / "test") if nested else (root / "test"), imgs, labels)
    x, y = load_cifar10("test", root=root)
    ex_imgs, ex_labels = interleaved(imgs, labels)
    assert y.tolist() == ex_labels.tolist()
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(ex_imgs).permute(0, 3, 1, 2))


def test_cifar10_torchvision_batches(isolated):
    rng = np.random.default_rng(7)
    folder = isolated / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {}
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        d = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, size=4).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": d, "labels": lab, "batch_label": name}, f)
        expected[name] = (d, lab)
    x, y = load_cifar10("test", root=isolated / "root")
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal((x * 255).round().to(torch.uint8).reshape(4, -1), torch.from_numpy(expected["test_batch"][0]))
    assert y.tolist() == expected["test_batch"][1]
    xt, yt = load_cifar10("train", root=isolated / "root")
    assert xt.shape == (20, 3, 32, 32)
    assert yt.tolist() == sum((expected[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_decode_cache_is_reused_and_invalidated(isolated, monkeypatch):
    imgs, labels = fake_cifar(2, seed=5)
    root = isolated / "root"
    root.mkdir()
    tar = root / "cifar10-jpeg.tar.gz"
    write_tar(tar, "test", imgs, labels)
    x1, y1 = load_cifar10("test", root=root)
    assert len(list((isolated / "cache").rglob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "_decode_tree", boom)
    x2, y2 = load_cifar10("test", root=root)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed: decode again
    with pytest.raises(AssertionError, match="decoded again"):
        load_cifar10("test", root=root)


def test_damaged_cache_is_rebuilt(isolated):
    imgs, labels = fake_cifar(1, seed=9)
    root = isolated / "root"
    root.mkdir()
    write_tar(root / "cifar10-jpeg.tar.gz", "test", imgs, labels)
    x1, _ = load_cifar10("test", root=root)
    (cache_file,) = list((isolated / "cache").rglob("*.pt"))
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        x2, _ = load_cifar10("test", root=root)
    assert torch.equal(x1, x2)


# ----------------------------------------------------------------------------- missing data


def test_missing_mnist_names_every_place(isolated):
    explicit = isolated / "explicit"
    with pytest.raises(DataNotFoundError, match="explicit does not exist"):
        load_mnist("test", root=explicit)  # a --data-root that names nothing is never ignored
    explicit.mkdir()
    with pytest.raises(DataNotFoundError) as exc:
        load_mnist("test", root=explicit)
    msg = str(exc.value)
    for place in (explicit, isolated / "empty-root", isolated / "cache" / "data"):
        assert str(place / "MNIST" / "raw") in msg
    assert "--data-root" in msg and "ROBUST_SURGERY_DATA" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_missing_cifar_reports_failed_download(isolated, monkeypatch):
    monkeypatch.delenv("ROBUST_SURGERY_NO_DOWNLOAD")
    monkeypatch.setattr(data, "_try_download", lambda *a: "Download into X with torchvision failed: offline")
    with pytest.raises(DataNotFoundError) as exc:
        load_cifar10("test")
    msg = str(exc.value)
    assert str(isolated / "empty-root" / "cifar10-jpeg.tar.gz") in msg
    assert "failed: offline" in msg and "cifar-10-batches-py" in msg


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_builtin_and_n(shared_data):
    ds = load_dataset("mnist", n=100, root=shared_data)
    assert len(ds) == 100
    x, y = ds.tensors
    assert x.shape == (100, 1, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]
    ds = load_dataset("cifar10", n=50)
    assert torch.bincount(ds.tensors[1], minlength=10).tolist() == [5] * 10
    with pytest.raises(ValueError, match="only 10000 points"):
        load_dataset("mnist", n=10001)


def test_load_dataset_unknown_spec_lists_valid():
    with pytest.raises(ValueError) as exc:
        load_dataset("mnsit")
    msg = str(exc.value)
    assert "Did you mean 'mnist'" in msg and "'cifar10'" in msg and "ImageFolder" in msg


def test_load_dataset_pt_file(tmp_path):
    imgs = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(6)
    torch.save({"images": imgs, "labels": labels}, tmp_path / "u8.pt")
    torch.save({"images": imgs.float() / 255, "labels": labels}, tmp_path / "f.pt")
    a = load_dataset(tmp_path / "u8.pt").tensors
    b = load_dataset(str(tmp_path / "f.pt"), n=4).tensors
    assert a[0].dtype == torch.float32 and torch.allclose(a[0][:4], b[0])
    assert a[1].tolist() == list(range(6)) and b[1].tolist() == [0, 1, 2, 3]
    torch.save({"images": imgs.float(), "labels": labels}, tmp_path / "bad.pt")  # 0..255 floats
    with pytest.raises(DataFormatError, match=r"\[0, 1\]"):
        load_dataset(tmp_path / "bad.pt")
    torch.save({"x": imgs}, tmp_path / "keys.pt")
    with pytest.raises(DataFormatError, match="'images' and 'labels'"):
        load_dataset(tmp_path / "keys.pt")


def test_load_dataset_generic_imagefolder(isolated):
    rng = np.random.default_rng(2)
    classes = ("zebra", "ant", "moth")
    folder = isolated / "faces"
    grey = rng.integers(0, 256, size=(6, 12, 10), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    for i, (img, lab) in enumerate(zip(grey, labels)):
        d = folder / "test" / classes[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i}.png")
    x, y = load_dataset(folder, split="test").tensors
    assert x.shape == (6, 1, 12, 10)  # grey stays one channel
    # classes are the sorted folder names: ant=0, moth=1, zebra=2
    names = sorted(classes)
    exp = [names.index(classes[lab]) for lab in labels]
    assert sorted(y.tolist()) == sorted(exp)
    assert y[:3].tolist() == [0, 1, 2]


def test_load_dataset_tar_spec(isolated):
    imgs, labels = fake_cifar(2, seed=11)
    tar = isolated / "mine.tar.gz"
    write_tar(tar, "test", imgs, labels)
    x, y = load_dataset(tar, split="test").tensors
    ex_imgs, ex_labels = interleaved(imgs, labels)  # CIFAR folder names sort into canonical order
    assert y.tolist() == ex_labels.tolist()
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(ex_imgs).permute(0, 3, 1, 2))
