"""Reader for the IDX files MNIST and Fashion-MNIST ship in (plain or gzipped)."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from . import FormatError, LabelledImages

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]

# Where Debian's fashion-mnist package installs the gzipped IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Where the Makefile's fallback for a user who is not root downloads with torchvision
# (``torchvision.datasets.FashionMNIST("data/raw", download=True)``), relative to the directory
# the command runs in: the files land in data/raw/FashionMNIST/raw/.
TORCHVISION_DOWNLOAD_ROOT = "data/raw"

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_SIDE = 28


def read_mnist(root: str, split: str) -> LabelledImages:
    return _read(_search_dirs(root, "MNIST", None), split, MNIST_CLASSES)


def read_fashion_mnist(root: str, split: str) -> LabelledImages:
    return _read(_search_dirs(root, "FashionMNIST", DEBIAN_FASHION_MNIST), split,
                 FASHION_MNIST_CLASSES)


def _search_dirs(root: str | None, torchvision_name: str, system_dir: str | None) -> list[str]:
    if not root:
        # No root given: a system-wide install, else the Makefile's torchvision download.
        download = os.path.abspath(os.path.join(TORCHVISION_DOWNLOAD_ROOT, torchvision_name, "raw"))
        return ([system_dir] if system_dir else []) + [download]
    return [root, os.path.join(root, torchvision_name, "raw")]


def _read(dirs: list[str], split: str, classes: list[str]) -> LabelledImages:
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = _locate(dirs, f"{prefix}-images-idx3-ubyte",
                                       f"{prefix}-labels-idx1-ubyte")
    images = _parse(images_path, _IMAGES_MAGIC)
    labels = _parse(labels_path, _LABELS_MAGIC)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise FormatError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                          f"expected {_SIDE}x{_SIDE}")
    if len(images) != len(labels):
        raise FormatError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                          f"{len(labels)} labels")
    if len(labels) and labels.max() >= len(classes):
        bad = int(np.argmax(labels >= len(classes)))
        raise FormatError(f"{labels_path}: label {int(labels[bad])} of sample {bad} is outside "
                          f"0..{len(classes) - 1}")
    return LabelledImages(images[..., None], labels.astype(np.int64), list(classes))


def _locate(dirs: list[str], images_name: str, labels_name: str) -> tuple[str, str]:
    """The images file and the labels file beside it, from the first directory holding images."""
    for directory in dirs:
        images_path = _existing(directory, images_name)
        if images_path is None:
            continue
        labels_path = _existing(directory, labels_name)
        if labels_path is None:
            raise FormatError(f"{os.path.join(directory, labels_name)}[.gz] is missing (the images "
                              f"are at {images_path})")
        return images_path, labels_path
    searched = ", ".join(dirs)
    raise FormatError(f"{images_name}[.gz] not found; searched {searched}")


def _existing(directory: str, name: str) -> str | None:
    for candidate in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _parse(path: str, magic: int) -> np.ndarray:
    """One IDX file: big-endian magic, big-endian uint32 dims, then the unsigned bytes."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise FormatError(f"{path}: cannot read: {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FormatError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise FormatError(f"{path}: IDX magic is 0x{found:08x}, expected 0x{magic:08x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise FormatError(f"{path}: file has {len(raw)} bytes but its header (dims {dims}) "
                          f"implies {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()
