"""Whole splits as normalised tensors, for stages that hold a small labelled set in memory."""

from __future__ import annotations

import torch

from .meta import DatasetMeta, read_meta, shard_urls
from .pipeline import load_classification_tensors


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] pixels -> float32 in the model's input space ((x/255 - mean) / std)."""
    scaled = images.to(torch.float32) / 255.0
    return (scaled - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def load_split(
    data_url: str, split: str, limit: int | None = None, meta: DatasetMeta | None = None
) -> tuple[torch.Tensor, torch.Tensor, DatasetMeta]:
    """Normalised images [N, C, H, W], int64 labels [N] (shard order) and the dataset's meta."""
    meta = meta or read_meta(data_url)
    images, labels, _ = load_classification_tensors(
        shard_urls(data_url, meta, split), meta.image_shape, meta.num_classes, limit=limit
    )
    return normalise(images, meta.mean, meta.std), labels, meta
