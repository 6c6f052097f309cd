"""``DATA/meta.json``: what a sharded dataset holds, written last by ingest (docs/design.md
section 3).

Its presence marks a finished ingest; everything downstream reads shapes, classes, the
normalisation and the shard list from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import storage

META_NAME = "meta.json"


class MetaError(ValueError):
    """meta.json is missing or malformed; the message names the file and the field."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the split directory, or a full URL (CC3M)
    count: int


@dataclass
class SplitInfo:
    size: int
    shards: list[ShardInfo]


@dataclass
class DatasetMeta:
    name: str
    task: str  # "classification" or "image_text"
    image_shape: list[int]  # [C, H, W] as the model sees it
    mean: list[float]  # per channel, of pixels scaled to [0, 1], train split
    std: list[float]
    splits: dict[str, SplitInfo]
    classes: list[str] = field(default_factory=list)
    format_version: int = 1
    # What else defines the data, e.g. Colored Fashion-MNIST's {"conflict_ratio": 0.05, ...}.
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_counts(meta: DatasetMeta, split: str) -> list[int]:
    """Each of ``split``'s shards' sample count, in the order of :func:`shard_urls`."""
    return [shard.count for shard in meta.splits[split].shards]


def shard_urls(data_url: str, meta: DatasetMeta, split: str) -> list[str]:
    """Full URLs of ``split``'s shards, in order."""
    if split not in meta.splits:
        raise MetaError(f"dataset {meta.name} has no split {split!r}; it has {sorted(meta.splits)}")
    urls = []
    for shard in meta.splits[split].shards:
        is_url = "://" in shard.name or shard.name.startswith("/")
        urls.append(shard.name if is_url else storage.join(data_url, split, shard.name))
    return urls


def write_meta(data_url: str, meta: DatasetMeta) -> None:
    storage.publish_json(storage.join(data_url, META_NAME), meta.to_json())


def read_meta(data_url: str) -> DatasetMeta:
    url = storage.join(data_url, META_NAME)
    if not storage.exists(url):
        raise MetaError(f"{url} does not exist: run `ead-dist ingest` for this dataset first")
    raw = storage.read_json(url)
    return parse_meta(raw, url)


def parse_meta(raw: Any, source: str) -> DatasetMeta:
    """Validate a decoded meta.json; errors name ``source`` and the offending field."""

    def need(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise MetaError(f"{source}: missing field {where}{key!r}")
        value = mapping[key]
        if not isinstance(value, kind):
            raise MetaError(f"{source}: field {where}{key!r} should be {kind}, got {value!r}")
        return value

    name = need(raw, "name", str, "")
    task = need(raw, "task", str, "")
    if task not in ("classification", "image_text"):
        raise MetaError(f"{source}: field 'task' must be classification or image_text, got {task!r}")
    shape = need(raw, "image_shape", list, "")
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise MetaError(f"{source}: field 'image_shape' must be [C, H, W] positive ints, got {shape}")
    mean = need(raw, "mean", list, "")
    std = need(raw, "std", list, "")
    if len(mean) != shape[0] or len(std) != shape[0] or not all(s > 0 for s in std):
        raise MetaError(f"{source}: fields 'mean'/'std' need {shape[0]} values (std > 0)")
    classes = raw.get("classes", [])
    attributes = raw.get("attributes", {})
    if not isinstance(attributes, dict):
        raise MetaError(f"{source}: field 'attributes' must be a mapping, got {attributes!r}")
    if task == "classification" and not classes:
        raise MetaError(f"{source}: field 'classes' is empty for a classification dataset")
    splits = {}
    for split, info in need(raw, "splits", dict, "").items():
        where = f"splits.{split}."
        shards = []
        for i, shard in enumerate(need(info, "shards", list, where)):
            shards.append(
                ShardInfo(
                    name=need(shard, "name", str, f"{where}shards[{i}]."),
                    count=need(shard, "count", int, f"{where}shards[{i}]."),
                )
            )
        size = need(info, "size", int, where)
        if size != sum(s.count for s in shards):
            raise MetaError(f"{source}: field {where}size={size} differs from its shard counts")
        splits[split] = SplitInfo(size=size, shards=shards)
    return DatasetMeta(
        name=name,
        task=task,
        image_shape=shape,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        splits=splits,
        classes=list(classes),
        format_version=int(raw.get("format_version", 1)),
        attributes=dict(attributes),
    )
