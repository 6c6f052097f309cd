"""Readers for the on-disk formats the datasets ship in, by dataset name.

Each reader turns one split of a dataset as downloaded into :class:`LabelledImages`: uint8
pixels [N, H, W, C] and int64 labels [N]. Ingest shards them; nothing else reads raw files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class FormatError(ValueError):
    """A raw dataset file is missing or malformed; the message names the file."""


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    classes: list[str]  # class names, index = label


Reader = Callable[[str, str], LabelledImages]  # (root, split in {"train", "test"}) -> data


def _registry() -> dict[str, Reader]:
    from . import cifar, idx, svhn, tiny_imagenet

    return {
        "mnist": idx.read_mnist,
        "fashion_mnist": idx.read_fashion_mnist,
        "svhn": svhn.read_svhn,
        "cifar10": cifar.read_cifar10,
        "cifar100": cifar.read_cifar100,
        "tiny_imagenet": tiny_imagenet.read_tiny_imagenet,
    }


CLASSIFICATION_DATASETS = ("mnist", "fashion_mnist", "svhn", "cifar10", "cifar100", "tiny_imagenet")


def read_split(dataset: str, root: str, split: str) -> LabelledImages:
    """Read ``split`` ("train" or "test") of ``dataset`` from its raw files under ``root``."""
    readers = _registry()
    if dataset not in readers:
        raise FormatError(
            f"unknown dataset {dataset!r}; known: {', '.join(sorted(readers))} (and cc3m, "
            "which is read from its img2dataset shards without ingest)"
        )
    if split not in ("train", "test"):
        raise FormatError(f"unknown split {split!r} for {dataset}; expected 'train' or 'test'")
    data = readers[dataset](root, split)
    _check(dataset, split, data)
    return data


def _check(dataset: str, split: str, data: LabelledImages) -> None:
    where = f"{dataset} {split}"
    if data.images.dtype != np.uint8 or data.images.ndim != 4:
        raise FormatError(f"{where}: images must be uint8 [N,H,W,C], got {data.images.dtype} "
                          f"{data.images.shape}")
    if len(data.images) != len(data.labels):
        raise FormatError(f"{where}: {len(data.images)} images but {len(data.labels)} labels")
    if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= len(data.classes)):
        bad = int(np.flatnonzero((data.labels < 0) | (data.labels >= len(data.classes)))[0])
        raise FormatError(f"{where}: label {int(data.labels[bad])} of sample {bad} is outside "
                          f"0..{len(data.classes) - 1}")
