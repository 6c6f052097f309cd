"""Check a dataset before (or after) ingest and list every problem, not only the first.

Three kinds of input: an image folder (ImageFolder layout), a user's WebDataset shards, or an
ingested ``DATA`` (it has ``meta.json``). Each check runs the very code ingest runs on each
file, catching its error instead of stopping, so validate and ingest never disagree. A problem
is one line that starts with the file (or shard and sample) it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import storage
from .formats import FormatError
from .formats.imagefolder import list_imagefolder
from .formats.imagefolder import read_images as read_folder_images
from .formats.webdataset_shards import (
    class_names,
    image_pixels,
    label_index,
    raw_label,
    samples,
    shard_list,
    where,
)
from .meta import META_NAME, MetaError, read_meta, shard_urls
from .pipeline import ShardError, decode_classification


@dataclass
class Report:
    checked: int = 0  # images (or samples) looked at
    problems: list[str] = field(default_factory=list)


def check_imagefolder(root: str, size: int, channels: int, test_fraction: float = 0.1,
                      allow_upscale: bool = False) -> Report:
    """Empty or unknown class folders, and every image that does not decode or fit."""
    report = Report()
    try:
        listing = list_imagefolder(root, test_fraction)
    except FormatError as error:
        return Report(0, [str(error)])
    report.problems += [f"{folder}: class folder holds no image file"
                        for folder in listing.empty_classes]
    report.problems += [f"{folder}: class is not among the train classes {listing.classes}"
                        for folder in listing.unknown_classes]
    for files in listing.files.values():
        for one in files:
            report.checked += 1
            try:
                read_folder_images([one], listing.classes, size, channels, allow_upscale)
            except FormatError as error:
                report.problems.append(str(error))
    return report


def check_webdataset(url: str, image_key: str, label_key: str, size: int, channels: int, *,
                     classes: list[str] | None = None, test_url: str | None = None,
                     allow_upscale: bool = False) -> Report:
    """Unreadable shards, and every sample whose image or label ingest would refuse."""
    report = Report()
    labels: list[tuple[str, str]] = []  # (where, raw label) of samples whose label reads
    try:
        urls = shard_list(url) + (shard_list(test_url) if test_url else [])
    except FormatError as error:
        return Report(0, [str(error)])
    for shard in urls:
        try:
            for sample in samples([shard]):
                report.checked += 1
                try:
                    image_pixels(sample, image_key, size, channels, allow_upscale)
                except FormatError as error:
                    report.problems.append(str(error))
                try:
                    labels.append((where(sample), raw_label(sample, label_key)))
                except FormatError as error:
                    report.problems.append(str(error))
        except (ShardError, storage.StorageError) as error:
            report.problems.append(f"{shard}: {error}")
    names = class_names([value for _, value in labels], classes)
    report.problems += [f"{place}: unknown label {value!r} (not a class index or one of "
                        f"{len(names)} class names)"
                        for place, value in labels if label_index(value, names) is None]
    return report


def check_data(data_url: str) -> Report:
    """Every sample of an ingested DATA decodes, has meta.json's shape and a label in range,
    and every shard holds the count meta.json lists."""
    try:
        meta = read_meta(data_url)
    except (MetaError, storage.StorageError) as error:
        return Report(0, [str(error)])
    if meta.task != "classification":
        return Report(0, [f"{data_url}: holds {meta.task} data; validate checks classification "
                          "data (image-text shards are checked by their ingest)"])
    report = Report()
    for split, info in meta.splits.items():
        for shard, url in zip(info.shards, shard_urls(data_url, meta, split)):
            count = 0
            try:
                for sample in samples([url]):
                    count += 1
                    try:
                        decode_classification(sample, meta.image_shape, meta.num_classes)
                    except ShardError as error:
                        report.problems.append(str(error))
            except (ShardError, storage.StorageError) as error:
                report.problems.append(f"{url}: {error}")
                continue
            report.checked += count
            if count != shard.count:
                report.problems.append(f"{url}: holds {count} samples, {META_NAME} lists "
                                       f"{shard.count}")
    return report


def is_ingested(url: str) -> bool:
    return storage.exists(storage.join(url, META_NAME))
