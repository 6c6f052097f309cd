"""Reader for the Tiny-ImageNet-200 folder of JPEGs (train per class; val as the test split)."""

from __future__ import annotations

import os

import numpy as np

from . import FormatError, LabelledImages

FOLDER = "tiny-imagenet-200"
_SIDE = 64


def read_tiny_imagenet(root: str, split: str) -> LabelledImages:
    base = _base(root or "")
    wnids = _wnids(os.path.join(base, "wnids.txt"))
    classes = _class_names(os.path.join(base, "words.txt"), wnids)
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        paths, labels = _train_files(base, wnids)
    else:
        # The official test/ split has no labels; the labelled val/ split serves as test.
        paths, labels = _val_files(base, label_of)
    images = np.empty((len(paths), _SIDE, _SIDE, 3), np.uint8)
    for i, path in enumerate(paths):
        images[i] = _decode(path)
    return LabelledImages(images, np.asarray(labels, np.int64), classes)


def _base(root: str) -> str:
    """``root`` itself if it is the tiny-imagenet-200 folder, else that folder inside it."""
    for base in (root, os.path.join(root, FOLDER)):
        if os.path.isfile(os.path.join(base, "wnids.txt")):
            return base
    raise FormatError(f"{os.path.join(root, 'wnids.txt')} is missing (also looked for "
                      f"{os.path.join(root, FOLDER, 'wnids.txt')})")


def _wnids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids:
        raise FormatError(f"{path}: lists no wnids")
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise FormatError(f"{path}: wnid {dup} is listed twice")
    return sorted(wnids)  # label order = sorted wnids, as torchvision's ImageFolder has it


def _class_names(path: str, wnids: list[str]) -> list[str]:
    """Names from words.txt ("wnid<TAB>name", covering all of WordNet) where given, else wnids."""
    names: dict[str, str] = {}
    if os.path.isfile(path):
        wanted = set(wnids)
        with open(path, encoding="utf-8") as f:
            for line in f:
                wnid, sep, name = line.rstrip("\n").partition("\t")
                if sep and wnid in wanted and name.strip():
                    names[wnid] = name.strip()
    return [names.get(wnid, wnid) for wnid in wnids]


def _train_files(base: str, wnids: list[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(base, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise FormatError(f"{folder}: training images folder for wnid {wnid} is missing")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))
        paths += [os.path.join(folder, n) for n in names]
        labels += [label] * len(names)
    return paths, labels


def _val_files(base: str, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    path = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: file is missing")
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6:
                raise FormatError(f"{path}:{number}: expected 6 tab-separated fields (filename, "
                                  f"wnid, 4 box coordinates), got {len(fields)}")
            name, wnid = fields[0], fields[1]
            if wnid not in label_of:
                raise FormatError(f"{path}:{number}: wnid {wnid} of {name} is not in wnids.txt")
            paths.append(os.path.join(base, "val", "images", name))
            labels.append(label_of[wnid])
    return paths, labels


def _decode(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # A few Tiny-ImageNet JPEGs are greyscale; convert gives every image 3 channels.
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError as e:
        raise FormatError(f"{path}: image file is missing") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise FormatError(f"{path}: cannot decode image: {e}") from e
    if pixels.shape != (_SIDE, _SIDE, 3):
        raise FormatError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                          f"{_SIDE}x{_SIDE}")
    return pixels
