"""Reader for torchvision's ImageFolder layout: ``ROOT/<class>/<images>``, or ``ROOT/train/<class>``
with an optional ``ROOT/test/<class>`` (or ``val``).

Classes are the train folder's sub-folder names, sorted (torchvision's order). Image files are
found recursively by extension, as ImageFolder finds them; other files are ignored. Without a
test folder, each image goes to the test split when a stable hash of its path relative to ROOT
falls below ``test_fraction``, so the split is the same on every machine and every rerun.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..resize import load_fitted
from . import FormatError, LabelledImages

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_FOLDERS = ("test", "val")


@dataclass
class FolderListing:
    root: str
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> (image path, label), sorted by path
    empty_classes: list[str]  # class folders (paths) that hold no image file
    unknown_classes: list[str]  # test class folders (paths) with no train folder of that name


def in_test_split(relative_path: str, test_fraction: float) -> bool:
    """Whether the image at ``relative_path`` (to ROOT, '/'-separated) is held out for test."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def _class_folders(folder: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [os.path.join(directory, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def list_imagefolder(root: str, test_fraction: float = 0.1) -> FolderListing:
    """Find the classes and the image files of each split under ``root``; reads no image."""
    if not os.path.isdir(root):
        raise FormatError(f"{root}: no such folder (expected ROOT/<class>/<images>)")
    if not 0.0 <= test_fraction < 1.0:
        raise FormatError(f"test fraction must be in [0, 1), got {test_fraction}")
    train_root = os.path.join(root, "train")
    has_train = os.path.isdir(train_root)
    test_root = next((os.path.join(root, name) for name in TEST_FOLDERS
                      if has_train and os.path.isdir(os.path.join(root, name))), None)
    train_root = train_root if has_train else root
    classes = _class_folders(train_root)
    if not classes:
        raise FormatError(f"{train_root}: holds no class folders (expected "
                          f"{train_root}/<class>/<images>)")
    files: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    empty: list[str] = []
    for label, name in enumerate(classes):
        paths = _image_files(os.path.join(train_root, name))
        if not paths:
            empty.append(os.path.join(train_root, name))
        for path in paths:
            held_out = test_root is None and in_test_split(
                os.path.relpath(path, root).replace(os.sep, "/"), test_fraction)
            files["test" if held_out else "train"].append((path, label))
    unknown: list[str] = []
    if test_root is not None:
        label_of = {name: label for label, name in enumerate(classes)}
        for name in _class_folders(test_root):
            folder = os.path.join(test_root, name)
            if name not in label_of:
                unknown.append(folder)
                continue
            paths = _image_files(folder)
            if not paths:
                empty.append(folder)
            files["test"] += [(path, label_of[name]) for path in paths]
    for split in files:
        files[split].sort()
    return FolderListing(root, classes, files, empty, unknown)


def check_listing(listing: FolderListing) -> None:
    """Raise on the first problem of the layout itself (not of any image)."""
    if listing.empty_classes:
        raise FormatError(f"{listing.empty_classes[0]}: class folder holds no image file "
                          f"({', '.join(IMAGE_EXTENSIONS)})")
    if listing.unknown_classes:
        raise FormatError(f"{listing.unknown_classes[0]}: class is not among the train "
                          f"classes {listing.classes}")
    for split, files in listing.files.items():
        if not files:
            raise FormatError(f"{listing.root}: the {split} split has no images (add a test "
                              "folder, or raise the test fraction)")


def read_images(files: list[tuple[str, int]], classes: list[str], size: int, channels: int,
                allow_upscale: bool = False) -> LabelledImages:
    """Decode and fit every listed image; the first bad one raises FormatError naming it."""
    images = np.empty((len(files), size, size, channels), np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = load_fitted(_read(path), size, channels, path, allow_upscale)
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return LabelledImages(images, labels, list(classes))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error}") from error
