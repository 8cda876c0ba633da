"""Data sets from local files: MNIST (IDX), CIFAR-10 (torchvision batches, ImageFolder tree, JPEG tar).

Every loader returns images as float32 ``N x C x H x W`` in [0, 1] and labels as int64 ``N``.
Files are looked up in the data roots of :func:`resolve_data_root`, in order: the explicit
``root`` argument, ``$ROBUST_SURGERY_DATA`` (several paths separated by ``os.pathsep``), then the
user cache ``$ROBUST_SURGERY_CACHE/data`` (default ``~/.cache/robust_surgery/data``), and last
(only when ``$ROBUST_SURGERY_DATA`` is unset) ``shared/data`` beside a source checkout. When nothing
is found, torchvision's ``download=True`` is tried into the user cache; offline, a
:class:`DataNotFoundError` lists every place looked and how to fix it.

Decoding JPEG/PNG trees is done once: the uint8 result is cached under :func:`cache_dir`, keyed by
the source's path, size and modification time.

Order of points: MNIST and torchvision's CIFAR-10 batches keep the original file order. Image-tree
sources (a folder tree or a tar of one) are sorted by class, then by file name, and then
interleaved round-robin over the classes (image 0 of every class, then image 1, ...), so that the
first ``n`` points of a split are class-balanced rather than all of the first class.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import TensorDataset

from robust_surgery._files import atomic_path
from robust_surgery.errors import InvalidInputError, MissingFileError

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetInfo",
    "cache_dir",
    "find_data_file",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "read_idx",
    "resolve_data_root",
]

ENV_DATA = "ROBUST_SURGERY_DATA"
ENV_CACHE = "ROBUST_SURGERY_CACHE"
ENV_NO_DOWNLOAD = "ROBUST_SURGERY_NO_DOWNLOAD"
_CACHE_VERSION = 1
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class DataNotFoundError(MissingFileError):
    """A data set or checkpoint was not found in any data root (the message lists where we looked)."""


class DataFormatError(InvalidInputError):
    """A data file exists but is corrupt or not in the expected format."""


# --------------------------------------------------------------------------- metadata

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR10_ALIASES = {"plane": "airplane", "car": "automobile"}


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a built-in data set: ``input_shape`` is (C, H, W); sizes are point counts."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    train_size: int
    test_size: int
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", 10, (1, 28, 28), tuple(str(i) for i in range(10)), 60000, 10000,
        "MNIST handwritten digits, 28x28 grey, [0,1] pixels (ToTensor), no normalisation",
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32), CIFAR10_CLASSES, 50000, 10000,
        "CIFAR-10, 32x32 RGB, [0,1] pixels (ToTensor), no normalisation",
    ),
}

# --------------------------------------------------------------------------- roots and cache


def cache_dir() -> Path:
    """Cache folder for decoded tensors: ``$ROBUST_SURGERY_CACHE`` or ``~/.cache/robust_surgery``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robust_surgery"


def check_data_root(data_root: str | os.PathLike) -> Path:
    """``data_root`` as a Path, or a clear error when it names no folder (a typo must not be ignored)."""
    path = Path(data_root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(f"the data root {path} {what}; give the folder that holds the data sets "
                                f"(--data-root DIR, Python data_root=) or leave it out to use ${ENV_DATA}")
    return path


def resolve_data_root(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Candidate data roots, in search order (they need not exist).

    Order: ``data_root`` (explicit argument), each path of ``$ROBUST_SURGERY_DATA`` (separated by
    ``os.pathsep``), then the user cache ``cache_dir() / "data"``, where downloads go, and last,
    only when ``$ROBUST_SURGERY_DATA`` is unset, ``shared/data`` beside a source checkout of this
    package (the team layout) if it exists.
    """
    out: list[Path] = []
    if data_root is not None and str(data_root) != "":
        out.append(check_data_root(data_root))
    env = os.environ.get(ENV_DATA, "")
    out.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p.strip())
    out.append(cache_dir() / "data")
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not env.strip() and beside_checkout.is_dir():  # a source checkout with shared/ beside it
        out.append(beside_checkout)
    seen, unique = set(), []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


_HOW_TO_FIX = (
    "Fix: pass --data-root DIR (or root=/data_root= in Python) pointing at a folder that holds it, "
    f"or set {ENV_DATA}=DIR."
)


def _not_found(what: str, looked: Iterable[Path | str], extra: str = "") -> DataNotFoundError:
    lines = "\n".join(f"  - {p}" for p in looked)
    msg = f"{what} not found. Looked in:\n{lines}\n{_HOW_TO_FIX}"
    if extra:
        msg += "\n" + extra
    return DataNotFoundError(msg)


def find_data_file(relpath: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """First existing ``<root>/<relpath>`` over :func:`resolve_data_root`; DataNotFoundError if none."""
    looked = [root / relpath for root in resolve_data_root(data_root)]
    for p in looked:
        if p.is_file():
            return p
    raise _not_found(f"File '{relpath}'", looked)


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path, make_parents=True) as tmp:
        torch.save(obj, tmp)

def _downloads_disabled() -> bool:
    return os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() not in ("", "0", "false", "no")


def _try_download(dataset_cls_name: str, split: str) -> str | None:
    """Run torchvision's download into the user cache root; return an error text, or None on success."""
    if _downloads_disabled():
        return f"Download skipped ({ENV_NO_DOWNLOAD} is set)."
    target = cache_dir() / "data"
    old_timeout = socket.getdefaulttimeout()
    try:
        import torchvision.datasets as tvd

        target.mkdir(parents=True, exist_ok=True)
        socket.setdefaulttimeout(30)
        getattr(tvd, dataset_cls_name)(str(target), train=(split == "train"), download=True)
        return None
    except Exception as exc:  # offline, proxy, disk full...: reported to the user, not raised
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        return f"Download into {target} with torchvision failed: {why}"
    finally:
        socket.setdefaulttimeout(old_timeout)


def _check_split(split: str) -> str:
    s = str(split).lower()
    if s not in ("train", "test"):
        raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
    return s


def _to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------- IDX / MNIST

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_MNIST_MAGIC = {"images": 2051, "labels": 2049}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataFormatError(
                f"{path}: corrupt gzip data ({exc}). Delete the file and download it again."
            ) from None
    return raw


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or not, detected by content) into an array of its declared shape.

    Header: 2 zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32 (16 bytes in all for MNIST images, 8 for labels). Raises DataFormatError
    for a bad magic number or a size that does not match the header.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    fix = "The file is corrupt or not an IDX file; delete it and download it again."
    if len(raw) < 4:
        raise DataFormatError(f"{path}: only {len(raw)} bytes, too short for an IDX header. {fix}")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(f"{path}: bad IDX magic number 0x{magic:08x}. {fix}")
    if expect_magic is not None and magic != expect_magic:
        raise DataFormatError(
            f"{path}: IDX magic number {magic} (0x{magic:08x}), expected {expect_magic} "
            f"(0x{expect_magic:08x}). {fix}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header. {fix}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path}: header declares shape {tuple(dims)} ({expected} data bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt). {fix}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _mnist_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_mnist(split: str, roots: list[Path], looked: list[Path]) -> tuple[Path, Path] | None:
    img_name, lab_name = _mnist_names(split)
    for root in roots:
        for base in (root / "MNIST" / "raw", root):
            looked.append(base / f"{img_name}[.gz]")
            found = []
            for name in (img_name, lab_name):
                hit = next((base / (name + s) for s in ("", ".gz") if (base / (name + s)).is_file()), None)
                found.append(hit)
            if all(found):
                return found[0], found[1]
    return None


def load_mnist(split: str = "test", root: str | os.PathLike | None = None, download: bool = True):
    """MNIST split as (images float32 N x 1 x 28 x 28 in [0,1], labels int64 N); N = 60000 or 10000.

    Looks for ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (torchvision's layout)
    or the same files directly in each data root.
    """
    split = _check_split(split)
    roots = resolve_data_root(root)
    looked: list[Path] = []
    found = _find_mnist(split, roots, looked)
    extra = ""
    if found is None and download:
        err = _try_download("MNIST", split)
        found = _find_mnist(split, roots, [])
        extra = err or ""
    if found is None:
        raise _not_found(f"MNIST ({split} split)", looked, extra)
    img_path, lab_path = found
    images = read_idx(img_path, _MNIST_MAGIC["images"])
    labels = read_idx(lab_path, _MNIST_MAGIC["labels"])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataFormatError(f"{img_path}: expected uint8 N x 28 x 28 images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{lab_path}: {labels.shape} labels do not match the {len(images)} images of {img_path}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{lab_path}: labels outside 0..9 (corrupt file)")
    x = _to_float(torch.from_numpy(images).unsqueeze(1))
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# --------------------------------------------------------------------------- image trees


def _class_index_cifar(names: Iterable[str], source: str) -> dict[str, int]:
    mapping = {}
    for n in names:
        canon = _CIFAR10_ALIASES.get(n.lower(), n.lower())
        if canon not in CIFAR10_CLASSES:
            raise DataFormatError(
                f"{source}: class folder '{n}' is not a CIFAR-10 class; expected the folders "
                f"{', '.join(CIFAR10_CLASSES)}"
            )
        mapping[n] = CIFAR10_CLASSES.index(canon)
    return mapping


def _iter_tar_images(path: Path, split: str | None) -> Iterator[tuple[str, str, bytes]]:
    """Yield (class folder, file name, bytes) of ``[...]/<split>/<class>/<file>`` image members.

    Streams the archive (no extraction to disk). ``split=None`` accepts ``<class>/<file>`` members.
    """
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = [p for p in PurePosixPath(m.name).parts if p not in (".", "")]
                if len(parts) < 2 or PurePosixPath(parts[-1]).suffix.lower() not in _IMAGE_SUFFIXES:
                    continue
                if split is not None and (len(parts) < 3 or parts[-3] != split):
                    continue
                f = tf.extractfile(m)
                if f is None:
                    continue
                yield parts[-2], parts[-1], f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot read the tar archive ({exc}); it is corrupt or truncated.") from None


def _iter_folder_images(folder: Path) -> Iterator[tuple[str, str, Path]]:
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir()):
            if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES:
                yield cls.name, f.name, f


def _decode_tree(items: Iterable[tuple[str, str, object]], source: str, cifar: bool):
    """Decode (class, file name, bytes or path) items to (uint8 N x C x H x W, int64 N, class names).

    CIFAR mode maps folders to CIFAR-10's canonical class order and requires 32x32 RGB; otherwise
    classes are the sorted folder names and all images must share one size (grey if all are grey).
    """
    from PIL import Image, UnidentifiedImageError

    per_class: dict[str, list[tuple[str, np.ndarray]]] = {}
    modes = set()
    for cls, name, data in items:
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                modes.add("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataFormatError(f"{source}: cannot decode image {cls}/{name} ({exc})") from None
        per_class.setdefault(cls, []).append((name, arr))
    if not per_class:
        raise DataFormatError(f"{source}: no images found (expected <class>/<image> files)")
    if cifar:
        index = _class_index_cifar(per_class, source)
        classes = list(CIFAR10_CLASSES)
    else:
        names = sorted(per_class)
        index = {n: i for i, n in enumerate(names)}
        classes = names
    grey = modes == {"L"} and not cifar
    ordered = sorted(per_class, key=lambda c: index[c])
    lists = [sorted(per_class[c], key=lambda t: t[0]) for c in ordered]
    images, labels = [], []
    for i in range(max(len(lst) for lst in lists)):  # round-robin over classes
        for c, lst in zip(ordered, lists):
            if i < len(lst):
                images.append(lst[i][1])
                labels.append(index[c])
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise DataFormatError(
            f"{source}: images have different sizes {sorted(shapes)[:4]}; resize them to one size first"
        )
    if cifar and shapes != {(32, 32, 3)}:
        raise DataFormatError(f"{source}: CIFAR-10 images must be 32x32 RGB, found {shapes.pop()}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    if grey:
        x = x[:, :1]
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64), classes


def _cache_key(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in (_CACHE_VERSION,) + parts).encode()).hexdigest()[:20]


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _folder_key(folder: Path) -> tuple:
    h = hashlib.sha1()
    for cls, name, f in _iter_folder_images(folder):
        st = f.stat()
        h.update(f"{cls}/{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return (os.path.abspath(folder), h.hexdigest())


def _cached_decode(kind: str, key: tuple, decode, cache_name: str):
    """Load ``cache_dir()/<cache_name>-<hash>.pt`` or run ``decode()`` and write it atomically."""
    path = cache_dir() / "decoded" / f"{cache_name}-{_cache_key(kind, *key)}.pt"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return obj["images"], obj["labels"], list(obj["classes"])
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            warnings.warn(f"ignoring unreadable cache file {path} ({exc}); decoding again", stacklevel=3)
    x, y, classes = decode()
    try:
        _atomic_torch_save({"images": x, "labels": y, "classes": list(classes), "source": str(key[0])}, path)
    except OSError as exc:
        warnings.warn(f"could not write the decode cache {path} ({exc}); continuing without it", stacklevel=3)
    return x, y, classes


def _load_tar_tree(path: Path, split: str | None, cifar: bool, cache_name: str):
    def decode():
        return _decode_tree(_iter_tar_images(path, split), f"{path} [{split or 'all'}]", cifar)

    return _cached_decode("tar", _stat_key(path) + (split, cifar), decode, cache_name)


def _load_folder_tree(folder: Path, cifar: bool, cache_name: str):
    def decode():
        return _decode_tree(_iter_folder_images(folder), str(folder), cifar)

    return _cached_decode("folder", _folder_key(folder) + (cifar,), decode, cache_name)


# --------------------------------------------------------------------------- CIFAR-10


def _load_cifar_batches(folder: Path, split: str):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        p = folder / name
        try:
            with open(p, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(
                f"{p}: not a readable CIFAR-10 python batch ({exc}); delete the folder and download again"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataFormatError(f"{p}: expected N x 3072 uint8 data with N labels, got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _has_class_dirs(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    names = {p.name.lower() for p in folder.iterdir() if p.is_dir()}
    names = {_CIFAR10_ALIASES.get(n, n) for n in names}
    return names == set(CIFAR10_CLASSES)


def _find_cifar10(split: str, roots: list[Path], looked: list[Path]):
    batch = "test_batch" if split == "test" else "data_batch_1"
    for root in roots:
        cands = [
            ("batches", root / "cifar-10-batches-py", lambda p: (p / batch).is_file()),
            ("folder", root / "cifar10" / split, _has_class_dirs),
            ("folder", root / split, _has_class_dirs),
            ("tar", root / "cifar10-jpeg.tar.gz", Path.is_file),
            ("tar", root / "cifar10" / "cifar10-jpeg.tar.gz", Path.is_file),
        ]
        for kind, path, ok in cands:
            looked.append(path)
            if ok(path):
                return kind, path
    return None


def _load_cifar10_uint8(split: str, root, download: bool):
    roots = resolve_data_root(root)
    looked: list[Path] = []
    found = _find_cifar10(split, roots, looked)
    extra = ""
    if found is None and download:
        extra = _try_download("CIFAR10", split) or ""
        found = _find_cifar10(split, roots, [])
    if found is None:
        raise _not_found(
            f"CIFAR-10 ({split} split)", looked,
            extra + ("\n" if extra else "") + "Accepted layouts: cifar-10-batches-py/ (torchvision), "
            "cifar10/{train,test}/<class>/*.jpg|png, {train,test}/<class>/ in the root, cifar10-jpeg.tar.gz.",
        )
    kind, path = found
    if kind == "batches":
        return _load_cifar_batches(path, split)
    if kind == "folder":
        x, y, _ = _load_folder_tree(path, cifar=True, cache_name=f"cifar10-{split}")
    else:
        x, y, _ = _load_tar_tree(path, split, cifar=True, cache_name=f"cifar10-{split}")
    return x, y


def load_cifar10(split: str = "test", root: str | os.PathLike | None = None, download: bool = True):
    """CIFAR-10 split as (images float32 N x 3 x 32 x 32 in [0,1], labels int64 N); N = 50000 or 10000.

    Sources, per data root in this order: torchvision's ``cifar-10-batches-py/``, an ImageFolder
    tree ``cifar10/<split>/<class>/`` or ``<split>/<class>/``, the JPEG tar ``cifar10-jpeg.tar.gz``.
    Labels follow CIFAR-10's canonical class order (:data:`CIFAR10_CLASSES`).
    """
    split = _check_split(split)
    x, y = _load_cifar10_uint8(split, root, download)
    return _to_float(x), y


# --------------------------------------------------------------------------- generic entry point


def _load_pt(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise DataFormatError(
            f"{path}: cannot load it as a tensor file ({type(exc).__name__}: {why}). Expected "
            "torch.save({'images': N x C x H x W tensor, 'labels': int64 N tensor}, path)."
        ) from None
    if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
        raise DataFormatError(f"{path}: expected a dict with keys 'images' and 'labels'")
    x, y = obj["images"], obj["labels"]
    if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataFormatError(
            f"{path}: 'images' must be an N x C x H x W tensor and 'labels' an N tensor "
            f"(got {getattr(x, 'shape', type(x))} and {getattr(y, 'shape', type(y))})"
        )
    if x.dtype == torch.uint8:
        x = _to_float(x)
    elif x.is_floating_point():
        x = x.to(torch.float32)
        if x.numel() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise DataFormatError(f"{path}: {bad} image(s) hold NaN or infinite pixels; store finite pixels in [0, 1]")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise DataFormatError(
                f"{path}: float images must lie in [0, 1] (found {x.min().item():.3g}..{x.max().item():.3g}); "
                "store un-normalised pixels"
            )
    else:
        raise DataFormatError(f"{path}: 'images' must be uint8 or float, got {x.dtype}")
    if y.is_floating_point() or y.is_complex():
        raise DataFormatError(f"{path}: 'labels' must be integer class indices, got {y.dtype}")
    if len(y) == 0:
        raise DataFormatError(f"{path}: the file holds no images (N = 0)")
    if int(y.min()) < 0:
        raise DataFormatError(f"{path}: labels must be class indices 0, 1, 2, ...; found {int(y.min())}")
    return x, y.to(torch.int64)


def _load_path_spec(path: Path, split: str):
    name = path.name.lower()
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        if not any(p.is_dir() for p in folder.iterdir()):
            raise DataFormatError(f"{folder}: an ImageFolder directory needs one sub-folder per class")
        cifar = _has_class_dirs(folder)
        x, y, _ = _load_folder_tree(folder, cifar=cifar, cache_name="imagefolder")
        return _to_float(x), y
    if name.endswith((".pt", ".pth")):
        return _load_pt(path)
    if name.endswith(_TAR_SUFFIXES):
        def decode():
            items = list(_iter_tar_images(path, split)) or list(_iter_tar_images(path, None))
            return _decode_tree(items, str(path), cifar=False)

        x, y, _ = _cached_decode("tar", _stat_key(path) + (split, "generic"), decode, "imagetar")
        return _to_float(x), y
    raise DataFormatError(
        f"{path}: unsupported data file; use an ImageFolder directory, a .pt file with "
        "{'images', 'labels'}, or a tar of an ImageFolder tree"
    )


def load_dataset(spec: str | os.PathLike, split: str = "test", root: str | os.PathLike | None = None,
                 n: int | None = None, download: bool = True) -> TensorDataset:
    """A TensorDataset of (float32 C x H x W image in [0,1], int64 label) pairs.

    ``spec``: ``"mnist"``, ``"cifar10"``, or a path to an ImageFolder directory (optionally with
    ``train/``/``test/`` inside), a tar of one, or a ``.pt`` file holding ``{"images": float in
    [0,1] or uint8 N x C x H x W, "labels": int64 N}``. ``n``: keep the first ``n`` points
    (deterministic; image-tree sources are class-interleaved, see the module docstring).
    """
    split = _check_split(split)
    key = str(spec).strip().lower().replace("-", "").replace("_", "")
    if key in DATASETS:
        x, y = (load_mnist if key == "mnist" else load_cifar10)(split, root, download=download)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            valid = list(DATASETS)
            close = difflib.get_close_matches(str(spec).lower(), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InvalidInputError(
                f"Unknown data set '{spec}': it is neither a built-in name nor an existing path.{hint} "
                f"Valid: {', '.join(repr(v) for v in valid)}, a path to an ImageFolder directory, "
                "or a .pt file with {'images', 'labels'}."
            )
        x, y = _load_path_spec(path, split)
    if n is not None:
        n = int(n)
        if n <= 0:
            raise InvalidInputError(f"n must be a positive number of points, got {n}")
        if n > len(x):
            raise InvalidInputError(f"n={n} but data set '{spec}' ({split}) has only {len(x)} points")
        x, y = x[:n].contiguous(), y[:n].contiguous()
    return TensorDataset(x, y)
