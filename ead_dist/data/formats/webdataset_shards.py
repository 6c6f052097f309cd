"""Reader for a user's own WebDataset shards, whatever their keys: labelled images to re-shard.

``image_key`` names the image field (``jpg``, or alternatives ``jpg;png``), ``label_key`` the
label field (``cls``, ``label.txt``, ``json``...): a class index or a class name, as text or as
a JSON scalar. Class names come from a given list (a label may be a name in it or an index into
it); otherwise integer labels keep their values (classes ``"0".."max"``) and any other labels
become the sorted distinct names. Shards are opened through the same fsspec openers as ours, so
brace URLs work locally and on S3. Without test shards, each sample goes to the test split when
a stable hash of its key falls below ``test_fraction``.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
from webdataset.shardlists import expand_urls

from ..pipeline import raw_samples
from ..resize import load_fitted
from . import FormatError, LabelledImages
from .imagefolder import in_test_split


def shard_list(url: str) -> list[str]:
    """The shard URLs of a brace pattern (``.../shard-{000..009}.tar``), in order."""
    urls = expand_urls(url)
    if not urls:
        raise FormatError(f"{url}: names no shards")
    return urls


def where(sample: dict) -> str:
    return f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"


def _field(sample: dict, keys: str, what: str) -> tuple[str, bytes]:
    for key in keys.split(";"):
        if key in sample:
            return key, sample[key]
    found = sorted(k for k in sample if not k.startswith("__"))
    raise FormatError(f"{where(sample)}: no {what} field {keys!r}; it has {found}")


def raw_label(sample: dict, label_key: str) -> str:
    """The label value of ``sample`` as text (an index or a name), before mapping to classes."""
    key, data = _field(sample, label_key, "label")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise FormatError(f"{where(sample)}: label field {key} is not text") from error
    if key == "json" or key.endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise FormatError(f"{where(sample)}: label field {key} is not JSON: {error}") from error
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise FormatError(f"{where(sample)}: label field {key} holds {value!r}; expected a "
                              "class index or name")
        text = str(value)
    if not text:
        raise FormatError(f"{where(sample)}: label field {key} is empty")
    return text


def image_pixels(sample: dict, image_key: str, size: int, channels: int,
                 allow_upscale: bool = False) -> np.ndarray:
    _, data = _field(sample, image_key, "image")
    return load_fitted(data, size, channels, where(sample), allow_upscale)


def samples(urls: list[str]) -> Iterator[dict]:
    """Undecoded samples of ``urls`` in order; a damaged shard raises ShardError naming it."""
    return iter(raw_samples(urls, split_nodes=False))


def class_names(labels: list[str], classes: list[str] | None) -> list[str]:
    """The class list: ``classes`` if given, else from the label values (see module doc)."""
    if classes is not None:
        return list(classes)
    if labels and all(v.isdigit() for v in labels):
        return [str(i) for i in range(max(int(v) for v in labels) + 1)]
    return sorted(set(labels))


def label_index(value: str, classes: list[str]) -> int | None:
    """The index of label ``value``: its position as a name, else its value as an index."""
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    return None


def read_webdataset_splits(
    url: str, image_key: str, label_key: str, size: int, channels: int, *,
    classes: list[str] | None = None, test_url: str | None = None, test_fraction: float = 0.1,
    allow_upscale: bool = False,
) -> dict[str, LabelledImages]:
    """Both splits, decoded and fitted; the first bad sample raises FormatError naming it."""
    sources = {"train": shard_list(url)} | ({"test": shard_list(test_url)} if test_url else {})
    read = []  # (split, pixels, label value, where), in reading order
    for source, urls in sources.items():
        for sample in samples(urls):
            split = source
            if test_url is None and in_test_split(sample["__key__"], test_fraction):
                split = "test"
            read.append((split, image_pixels(sample, image_key, size, channels, allow_upscale),
                         raw_label(sample, label_key), where(sample)))
    names = class_names([value for _, _, value, _ in read], classes)
    indices = [label_index(value, names) for _, _, value, _ in read]
    for index, (_, _, value, place) in zip(indices, read):
        if index is None:
            raise FormatError(f"{place}: label {value!r} is not a class index or one of "
                              f"{len(names)} class names")
    result = {}
    for split in ("train", "test"):
        chosen = [i for i, record in enumerate(read) if record[0] == split]
        if not chosen:
            raise FormatError(f"{url}: the {split} split has no samples (give test shards, or "
                              "raise the test fraction)")
        result[split] = LabelledImages(np.stack([read[i][1] for i in chosen]),
                                       np.asarray([indices[i] for i in chosen], np.int64), names)
    return result
