"""Ingest: turn a dataset as downloaded into ``DATA/{train,test}/shard-*.tar`` + ``DATA/meta.json``.

One Ray task writes each shard (or the shards are written in-process when Ray is off). The
stage is idempotent: ``meta.json`` is published last, so its presence means done; shards that
already exist with the right sample count are kept, so an interrupted ingest resumes where it
stopped. A user's own images (an ImageFolder, their own WebDataset shards) are read whole
first, then sharded the same way (:func:`ingest_images`). CC3M needs no conversion: its
img2dataset shards are validated where they are and listed in ``meta.json``.
"""

from __future__ import annotations

import logging
import tarfile
from typing import Callable

import numpy as np

from .. import storage
from ..fingerprint import guard_ingest
from ..progress import progress_bar
from .formats import LabelledImages, read_split
from .meta import (
    META_NAME,
    DatasetMeta,
    MetaError,
    ShardInfo,
    SplitInfo,
    read_meta,
    write_meta,
)
from .shards import shard_name, write_classification_shard

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000


def channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 [N, H, W, C] pixels scaled to [0, 1]."""
    count = images.shape[0] * images.shape[1] * images.shape[2]
    total = np.zeros(images.shape[3])
    total_sq = np.zeros(images.shape[3])
    for start in range(0, len(images), 4096):  # chunks bound the float64 copy
        block = images[start : start + 4096].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block**2).sum(axis=(0, 1, 2))
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _existing_count(url: str) -> int | None:
    """Sample count of a published shard, or None when absent or unreadable."""
    if not storage.exists(url):
        return None
    try:
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            return sum(1 for m in tar if m.name.endswith(".cls"))
    except (tarfile.TarError, OSError, storage.StorageError):
        return None


def _write_shard_task(url: str, images: np.ndarray, labels: np.ndarray, first: int,
                      s3_options: dict) -> int:
    storage.configure(s3_options)  # the driver's storage settings, not this worker's env
    return write_classification_shard(url, images, labels, first)


def write_split(
    data_url: str, split: str, data: LabelledImages, shard_size: int, use_ray: bool
) -> SplitInfo:
    """Write the shards of one split that are not already there; returns their listing."""
    plan = [
        (index, start, min(start + shard_size, len(data.labels)))
        for index, start in enumerate(range(0, len(data.labels), shard_size))
    ]
    infos = [ShardInfo(shard_name(i), stop - start) for i, start, stop in plan]
    todo = [
        (storage.join(data_url, split, shard_name(i)), start, stop)
        for i, start, stop in plan
        if _existing_count(storage.join(data_url, split, shard_name(i))) != stop - start
    ]
    if len(todo) < len(plan):
        log.info("%s: %d of %d shards already written, resuming", split, len(plan) - len(todo),
                 len(plan))
    progress = progress_bar(f"ingest {split}", total=len(plan), initial=len(plan) - len(todo),
                            unit="shard")
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(_write_shard_task)
        # Each slice travels to its task through the object store; the driver keeps no copy.
        s3_options = storage.current_options()
        pending = [
            task.remote(url, data.images[start:stop], data.labels[start:stop], start, s3_options)
            for url, start, stop in todo
        ]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            progress.update(len(done))
    else:
        for url, start, stop in todo:
            write_classification_shard(url, data.images[start:stop], data.labels[start:stop], start)
            progress.update(1)
    progress.close()
    return SplitInfo(size=len(data.labels), shards=infos)


def ingest_classification(
    dataset: str, source: str, data_url: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
    use_ray: bool = True,
) -> DatasetMeta:
    """Shard ``dataset`` read from ``source`` (raw files) into ``data_url``; skip if done."""
    done = read_meta(data_url) if storage.exists(storage.join(data_url, META_NAME)) else None
    if done is not None and done.name != dataset:
        raise MetaError(f"{data_url} already holds dataset {done.name!r}, not {dataset!r}")
    guard_ingest(data_url, dataset)
    if done is not None:
        log.info("%s is already ingested at %s", dataset, data_url)
        return done
    splits = {}
    shape = None
    mean = std = None
    classes: list[str] = []
    for split in ("train", "test"):
        data = read_split(dataset, source, split)
        log.info("%s %s: %d images of shape %s", dataset, split, len(data.labels),
                 data.images.shape[1:])
        if split == "train":
            mean, std = channel_statistics(data.images)
            shape = [int(data.images.shape[3]), int(data.images.shape[1]), int(data.images.shape[2])]
            classes = data.classes
        splits[split] = write_split(data_url, split, data, shard_size, use_ray)
        del data
    meta = DatasetMeta(name=dataset, task="classification", image_shape=shape, mean=mean,
                       std=std, splits=splits, classes=classes)
    write_meta(data_url, meta)
    return meta


def ingest_images(
    name: str, data_url: str, read: Callable[[], dict[str, LabelledImages]], image_size: int,
    channels: int, *, shard_size: int = DEFAULT_SHARD_SIZE, use_ray: bool = True,
    attributes: dict | None = None,
) -> DatasetMeta:
    """Shard the splits ``read()`` returns (a user's own images) into ``data_url``.

    Every image is decoded before anything is written, so a bad file stops the ingest with
    nothing at ``data_url``; then shards are published whole and ``meta.json`` last, as above.
    """
    shape = [channels, image_size, image_size]
    if storage.exists(storage.join(data_url, META_NAME)):
        done = read_meta(data_url)
        if done.name != name or done.image_shape != shape or \
                done.attributes != (attributes or {}):
            def described(dataset: str, image_shape: list, extra: dict | None) -> str:
                return f"{dataset!r} of shape {image_shape}" + (f" {extra}" if extra else "")

            raise MetaError(f"{data_url} already holds dataset "
                            f"{described(done.name, done.image_shape, done.attributes)}, not "
                            f"{described(name, shape, attributes)}")
        log.info("%s is already ingested at %s", name, data_url)
        return done
    splits = read()
    guard_ingest(data_url, name, image_size, attributes)
    mean, std = channel_statistics(splits["train"].images)
    infos = {}
    for split in ("train", "test"):
        data = splits[split]
        log.info("%s %s: %d images in %d classes", name, split, len(data.labels),
                 len(data.classes))
        infos[split] = write_split(data_url, split, data, shard_size, use_ray)
    meta = DatasetMeta(name=name, task="classification", image_shape=shape, mean=mean, std=std,
                       splits=infos, classes=splits["train"].classes,
                       attributes=dict(attributes or {}))
    write_meta(data_url, meta)
    return meta


COLORED_FASHION_MNIST = "colored_fashion_mnist"
BIAS_FILE = "bias.safetensors"  # DATA/bias.safetensors: per-sample colour and conflict flag


def ingest_colored_fashion_mnist(
    source: str, data_url: str, conflict_ratio: float = 0.05, *, seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE, use_ray: bool = True,
) -> DatasetMeta:
    """Colored Fashion-MNIST from the real IDX files under ``source`` ("" finds Debian's):
    train biased at ``conflict_ratio``, test unbiased (:mod:`ead_dist.data.colouring`).

    Beside the shards, ``DATA/bias.safetensors`` holds ``{split}_colour`` (int64 [N]) and
    ``{split}_conflicting`` (bool [N]) indexed by sample index (the shard key); meta.json's
    ``attributes`` record the ratio and the seed.
    """
    import torch

    from .colouring import COLOUR_NAMES, CONFLICT_RATIOS, PALETTE, assign_colours, tint
    from .formats.idx import read_fashion_mnist

    if conflict_ratio not in CONFLICT_RATIOS:
        raise MetaError(f"conflict ratio {conflict_ratio} is not one of {CONFLICT_RATIOS}")
    attributes = {"conflict_ratio": conflict_ratio, "seed": seed, "test_split": "unbiased"}
    name, size = COLORED_FASHION_MNIST, 28
    options = dict(shard_size=shard_size, use_ray=use_ray, attributes=attributes)
    if storage.exists(storage.join(data_url, META_NAME)):  # done: checked, nothing read
        return ingest_images(name, data_url, dict, size, 3, **options)
    guard_ingest(data_url, name, size, attributes)
    splits, flags = {}, {}
    for offset, split in enumerate(("train", "test")):
        grey = read_fashion_mnist(source, split)
        ratio = conflict_ratio if split == "train" else None
        colours, conflicting = assign_colours(grey.labels, len(PALETTE), ratio, seed + offset)
        splits[split] = LabelledImages(tint(grey.images, colours), grey.labels, grey.classes)
        flags[f"{split}_colour"] = torch.from_numpy(colours)
        flags[f"{split}_conflicting"] = torch.from_numpy(conflicting)
    # Before the shards and meta.json, so a finished ingest always has it.
    storage.save_tensors(storage.join(data_url, BIAS_FILE), flags,
                         {"palette": PALETTE.tolist(), "colour_names": list(COLOUR_NAMES),
                          **attributes})
    return ingest_images(name, data_url, lambda: splits, size, 3, **options)
