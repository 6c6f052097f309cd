"""Read shards back: a short chain of named WebDataset stages, the same for every storage URL.

shard list -> split by node (rank) -> split by DataLoader worker -> tar samples -> shuffle ->
decode + validate. Classification samples come out as ``(key, image uint8 [C, H, W], label)``;
image-text samples as ``(key, image uint8 [3, S, S], caption)``. A damaged shard or sample
raises :class:`ShardError` naming the shard URL and the sample key.
"""

from __future__ import annotations

import io
import random
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from .gopen import register_fsspec_openers


class ShardError(ValueError):
    """A shard or a sample in it is unreadable or invalid; names the shard and the key."""


def _raise_naming_shard(error: Exception) -> bool:
    """WebDataset error handler: re-raise with the shard URL WebDataset appended to args."""
    shard = next(
        (a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")),
        "unknown shard",
    )
    raise ShardError(f"cannot read shard {shard}: {error.args[0] if error.args else error}") from error


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ShardError(f"{where}: image does not decode: {error}") from error
    return array[:, :, None] if array.ndim == 2 else array


def _where(sample: dict) -> str:
    return f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"


def classification_label(sample: dict, num_classes: int | None = None) -> int:
    """The validated label of a raw ``{png, cls}`` sample, without decoding its image."""
    where = _where(sample)
    if "png" not in sample or "cls" not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        if fields and set(fields) <= {"png", "cls"}:  # one of the pair: the tar ends mid-record
            raise ShardError(f"{where}: the shard is truncated: its last sample has only "
                             f"{fields[0]} (expected png and cls)")
        raise ShardError(f"{where}: expected fields png and cls, found {fields}")
    try:
        label = int(sample["cls"].decode())
    except ValueError as error:
        raise ShardError(f"{where}: field cls is not an integer: {sample['cls']!r}") from error
    if num_classes is not None and not 0 <= label < num_classes:
        raise ShardError(f"{where}: field cls={label} is outside 0..{num_classes - 1}")
    return label


def decode_classification(
    sample: dict, image_shape: list[int] | None = None, num_classes: int | None = None
) -> tuple[str, torch.Tensor, int]:
    """(key, image uint8 [C, H, W], label) from a raw ``{png, cls}`` sample, validated."""
    label = classification_label(sample, num_classes)
    image = torch.from_numpy(_decode_image(sample["png"], _where(sample)).copy()).permute(2, 0, 1)
    if image_shape is not None and list(image.shape) != list(image_shape):
        raise ShardError(f"{_where(sample)}: image has shape {list(image.shape)}, meta.json says "
                         f"{list(image_shape)}")
    return sample["__key__"], image, label


def decode_image_text(sample: dict, image_size: int) -> tuple[str, torch.Tensor, str]:
    """(key, image uint8 [3, S, S] centre-cropped and resized, caption) from img2dataset files."""
    where = f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
    image_field = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
    if image_field is None or "txt" not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where}: expected an image (jpg) and a caption (txt), found {fields}")
    try:
        with Image.open(io.BytesIO(sample[image_field])) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize(
                (image_size, image_size), Image.BICUBIC
            )
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ShardError(f"{where}: image does not decode: {error}") from error
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    return sample["__key__"], torch.from_numpy(array.copy()).permute(2, 0, 1), caption


def _shuffle(buffer: int, seed: int):
    def stage(samples: Iterable) -> Iterator:
        rng = random.Random(seed)
        pool: list = []
        for sample in samples:
            pool.append(sample)
            if len(pool) >= buffer:
                yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool

    return stage


def _check_counts(expected: dict[str, int]):
    """A stage that counts each shard's samples as they pass and, at the shard's end, fails
    naming the shard and both counts when they differ from ``expected`` (meta.json's): a tar
    cut at a record boundary reads without any other complaint."""

    def check(url: str | None, seen: int) -> None:
        if url is None or url not in expected or seen == expected[url]:
            return
        why = "it is truncated" if seen < expected[url] else "it was rewritten after ingest"
        raise ShardError(f"shard {url} holds {seen} samples, meta.json says {expected[url]}: "
                         f"{why}")

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        current, seen = None, 0
        for sample in samples:
            url = sample.get("__url__")
            if url != current:
                check(current, seen)
                current, seen = url, 0
            seen += 1
            yield sample
        check(current, seen)  # reached only when the stream was read to its end

    return stage


def raw_samples(
    urls: list[str], *, shuffle_buffer: int = 0, seed: int = 0, split_nodes: bool = True,
    select: Callable[[str], bool] | None = None, counts: Sequence[int] | None = None,
) -> wds.DataPipeline:
    """Undecoded samples of ``urls``; this rank's and this DataLoader worker's share of them.

    ``select(key)`` keeps only the samples it accepts, before anything is decoded. With
    ``counts`` (each shard's sample count from meta.json, in the order of ``urls``) every shard
    read to its end is checked against its count (:class:`ShardError` naming both).
    """
    register_fsspec_openers()
    stages = [wds.SimpleShardList(list(urls))]
    if split_nodes:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=_raise_naming_shard)]
    if counts is not None:
        stages.append(_check_counts(dict(zip(urls, counts, strict=True))))
    if select is not None:
        stages.append(wds.select(lambda sample: select(sample["__key__"])))
    if shuffle_buffer > 1:
        stages.append(_shuffle(shuffle_buffer, seed))
    return wds.DataPipeline(*stages)


def classification_samples(
    urls: list[str],
    *,
    image_shape: list[int] | None = None,
    num_classes: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    split_nodes: bool = True,
    select: Callable[[str], bool] | None = None,
    counts: Sequence[int] | None = None,
) -> wds.DataPipeline:
    """(key, image uint8 [C, H, W], label) for every sample of this rank's shards (each
    checked against its count in ``counts``, see :func:`raw_samples`)."""
    pipeline = raw_samples(urls, shuffle_buffer=shuffle_buffer, seed=seed,
                           split_nodes=split_nodes, select=select, counts=counts)
    pipeline.append(wds.map(lambda s: decode_classification(s, image_shape, num_classes)))
    return pipeline


def image_text_samples(
    urls: list[str],
    *,
    image_size: int,
    shuffle_buffer: int = 0,
    seed: int = 0,
    split_nodes: bool = True,
) -> wds.DataPipeline:
    """(key, image uint8 [3, S, S], caption) for every sample of this rank's shards."""
    pipeline = raw_samples(urls, shuffle_buffer=shuffle_buffer, seed=seed, split_nodes=split_nodes)
    pipeline.append(wds.map(lambda s: decode_image_text(s, image_size)))
    return pipeline


def load_classification_tensors(
    urls: list[str], image_shape: list[int] | None = None, num_classes: int | None = None,
    limit: int | None = None, counts: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All samples of ``urls`` (up to ``limit``) in order: uint8 images, int64 labels, keys."""
    images, labels, keys = [], [], []
    for key, image, label in classification_samples(
        urls, image_shape=image_shape, num_classes=num_classes, split_nodes=False, counts=counts
    ):
        images.append(image)
        labels.append(label)
        keys.append(key)
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise ShardError(f"no samples in shards {urls[:3]}{'...' if len(urls) > 3 else ''}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys
