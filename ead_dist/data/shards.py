"""Write WebDataset shards of labelled images, published whole on any storage URL.

A classification sample is ``KEY.png`` (lossless) + ``KEY.cls`` (class index as text). A shard
is built in memory and published with one write, so an interrupted ingest never leaves a
half-written shard under its final name (docs/design.md section 3).
"""

from __future__ import annotations

import io

import numpy as np
import webdataset as wds
from PIL import Image

from .. import storage

SHARD_PATTERN = "shard-{:06d}.tar"


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(index: int) -> str:
    """Keys are the sample's position in its split, zero-padded so they sort."""
    return f"{index:09d}"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image with C in {1, 3}."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 [H, W, 1|3] image, got {image.dtype} {image.shape}")
    pixels = image[:, :, 0] if image.shape[2] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def classification_shard_bytes(images: np.ndarray, labels: np.ndarray, first_index: int) -> bytes:
    """The tar bytes of one shard holding ``images`` [N, H, W, C] with ``labels`` [N]."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for offset, (image, label) in enumerate(zip(images, labels)):
            writer.write(
                {
                    "__key__": sample_key(first_index + offset),
                    "png": encode_png(image),
                    "cls": str(int(label)).encode(),
                }
            )
    return buffer.getvalue()


def write_classification_shard(
    url: str, images: np.ndarray, labels: np.ndarray, first_index: int
) -> int:
    """Publish one shard at ``url``; returns its sample count."""
    storage.publish_bytes(url, classification_shard_bytes(images, labels, first_index))
    return len(labels)
