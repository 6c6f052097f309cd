"""Labelled images as normalised tensors: whole splits, for stages that hold a small labelled
set in memory, or a class-balanced sample streamed from a split of any size."""

from __future__ import annotations

import torch

from .meta import DatasetMeta, read_meta, shard_counts, shard_urls
from .pipeline import (
    classification_label,
    decode_classification,
    load_classification_tensors,
    raw_samples,
)
from .reservoir import class_reservoirs


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] pixels -> float32 in the model's input space ((x/255 - mean) / std)."""
    scaled = images.to(torch.float32) / 255.0
    return (scaled - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def unnormalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The inverse of :func:`normalise` for viewing: float32 pixels in [0, 1] (clipped, since a
    learned image may leave the range real pixels span)."""
    pixels = images.to(torch.float32) * torch.tensor(std).view(1, -1, 1, 1)
    return (pixels + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0.0, 1.0)


def load_split(
    data_url: str, split: str, limit: int | None = None, meta: DatasetMeta | None = None
) -> tuple[torch.Tensor, torch.Tensor, DatasetMeta]:
    """Normalised images [N, C, H, W], int64 labels [N] (shard order) and the dataset's meta."""
    meta = meta or read_meta(data_url)
    images, labels, _ = load_classification_tensors(
        shard_urls(data_url, meta, split), meta.image_shape, meta.num_classes, limit=limit,
        counts=shard_counts(meta, split),
    )
    return normalise(images, meta.mean, meta.std), labels, meta


def class_balanced_sample(
    data_url: str, split: str, per_class: int, seed: int, meta: DatasetMeta | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class, drawn uniformly (seeded) in one streaming pass over
    the split's shards: normalised images [per_class x C, C, H, W] and labels, class-major.

    Only the chosen samples are held (undecoded until chosen), so memory is O(per_class x
    classes) whatever the size of the split.
    """
    meta = meta or read_meta(data_url)
    samples = raw_samples(shard_urls(data_url, meta, split), split_nodes=False,
                          counts=shard_counts(meta, split))
    stream = ((classification_label(s, meta.num_classes), s) for s in samples)
    reservoirs = class_reservoirs(stream, per_class, meta.num_classes, seed)
    chosen = [decode_classification(s, meta.image_shape, meta.num_classes)
              for reservoir in reservoirs for s in sorted(reservoir, key=lambda s: s["__key__"])]
    images = torch.stack([image for _, image, _ in chosen])
    labels = torch.tensor([label for _, _, label in chosen], dtype=torch.int64)
    return normalise(images, meta.mean, meta.std), labels
