"""Stream image-caption pairs from img2dataset shards the way open_clip's training code does.

shards (brace URLs; resampled with replacement, or split by node then by DataLoader worker) ->
tar samples -> held-out split by key hash -> shuffle -> decode (torchvision.io JPEG, resize the
short side, centre crop) -> ``with_epoch``. A broken sample (an image that does not decode, an
empty caption, a missing ``.txt`` or image) is skipped and counted by :class:`SkipBroken`, per
reason and per shard; past its limit the stream stops with a :class:`ShardError` naming the
shard. Every callable handed to WebDataset is module level or a plain object, so the pipeline
survives spawned DataLoader workers.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from .gopen import register_fsspec_openers
from .pipeline import ShardError

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class BrokenSample(ValueError):
    """One sample that cannot be used; ``reason`` is one of the counted kinds."""

    def __init__(self, reason: str, shard: str, key: str, detail: str = ""):
        super().__init__(f"shard {shard} sample {key}: {reason}{': ' + detail if detail else ''}")
        self.reason, self.shard, self.key = reason, shard, key


@dataclass
class SkipBroken:
    """WebDataset handler: skip a broken sample and count it, up to ``limit`` in all.

    ``limit`` None never stops; 0 stops at the first. Errors that are not a
    :class:`BrokenSample` (an unreadable tar, a storage error) are counted as ``shard`` and
    follow the same limit, as open_clip's ``log_and_continue`` does.
    """

    limit: Optional[int] = 0
    counts: Counter = field(default_factory=Counter)  # reason -> skipped samples
    by_shard: Counter = field(default_factory=Counter)  # shard URL -> skipped samples

    def __call__(self, error: Exception) -> bool:
        if isinstance(error, BrokenSample):
            reason, shard = error.reason, error.shard
        else:
            reason = "shard"
            shard = next((a for a in reversed(error.args)
                          if isinstance(a, str) and ".tar" in a), "unknown shard")
        self.counts[reason] += 1
        self.by_shard[shard] += 1
        if self.limit is not None and self.skipped > self.limit:
            raise ShardError(f"more than {self.limit} broken samples (limit "
                             f"data.max_broken_samples): the last in shard {shard}: {error}; "
                             f"skipped so far {dict(self.counts)}") from error
        return True

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())


def held_out(key: str, fraction: float) -> bool:
    """Whether sample ``key`` belongs to the held-out split: a hash of the key, so the split is
    the same on every node, worker and rerun, whatever the shard order."""
    digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return digest / 2.0**64 < fraction


def decode_pair(sample: dict, image_size: int) -> tuple[str, torch.Tensor, str]:
    """(key, image uint8 [3, S, S], caption) of one img2dataset sample; raises
    :class:`BrokenSample` naming why it cannot be used."""
    shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    image_field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if image_field is None:
        raise BrokenSample("missing image", shard, key)
    if "txt" not in sample:
        raise BrokenSample("missing txt", shard, key)
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise BrokenSample("empty caption", shard, key)
    data = sample[image_field]
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        raise BrokenSample("corrupt image", shard, key, str(error).splitlines()[0]) from error
    image = F.resize(image, [image_size], antialias=True)  # the short side to S
    return key, F.center_crop(image, [image_size, image_size]), caption


class _Decode:
    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, sample: dict) -> tuple[str, torch.Tensor, str]:
        return decode_pair(sample, self.image_size)


class _Split:
    """Keep the held-out part (``held=True``) or the rest of the samples."""

    def __init__(self, fraction: float, held: bool):
        self.fraction, self.held = fraction, held

    def __call__(self, sample: dict) -> bool:
        return held_out(sample["__key__"], self.fraction) == self.held


class _Keys:
    """Keep the samples whose key is in ``keys`` (before anything is decoded)."""

    def __init__(self, keys: set[str]):
        self.keys = keys

    def __call__(self, sample: dict) -> bool:
        return sample["__key__"] in self.keys


def _key_and_shard(sample: dict) -> tuple[str, str]:
    return sample["__key__"], sample["__url__"]


def _split_samples(shards: list[str], handler: SkipBroken, held_out_fraction: float,
                   split: str, split_nodes: bool, resampled: bool = False,
                   seed: int = 0) -> list:
    """The stages up to the held-out split: shard list, splitting, tar samples, split by key."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if resampled:
        stages = [wds.ResampledShards(shards, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(shards)]
        if split_nodes:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=handler))
    if held_out_fraction > 0:
        stages.append(wds.select(_Split(held_out_fraction, split == "test")))
    elif split == "test":
        raise ValueError("split 'test' needs held_out_fraction > 0")
    return stages


def image_text_keys(urls: list[str], *, handler: SkipBroken, held_out_fraction: float = 0.0,
                    split: str = "train") -> wds.DataPipeline:
    """(key, shard URL) of every sample of ``split`` in ``urls``, in order, without decoding
    (a sample whose image would not decode is listed all the same)."""
    register_fsspec_openers()
    stages = _split_samples(list(urls), handler, held_out_fraction, split, split_nodes=False)
    return wds.DataPipeline(*stages, wds.map(_key_and_shard))


class _BatchOf:
    """Tag each sample with its batch: ``(shard URL, j)`` for the j-th run of ``batch_size``
    consecutive samples of its shard (counted after the split, before anything is decoded), or
    None when that run is not ``wanted``. One instance per stream: it counts per shard."""

    def __init__(self, batch_size: int, wanted: dict[str, set[int]]):
        self.batch_size, self.wanted = batch_size, wanted
        self.position: Counter = Counter()

    def __call__(self, sample: dict) -> dict:
        url = sample["__url__"]
        j = self.position[url] // self.batch_size
        self.position[url] += 1
        sample["__batch__"] = (url, j) if j in self.wanted.get(url, ()) else None
        return sample


def _in_a_batch(sample: dict) -> bool:
    return sample["__batch__"] is not None


class _DecodeInBatch(_Decode):
    def __call__(self, sample: dict) -> tuple[tuple[str, int], torch.Tensor, str]:
        _key, image, caption = decode_pair(sample, self.image_size)
        return sample["__batch__"], image, caption


def image_text_batches(urls: list[str], *, image_size: int, handler: SkipBroken,
                       batch_size: int, wanted: dict[str, set[int]],
                       held_out_fraction: float = 0.0, split: str = "train"
                       ) -> wds.DataPipeline:
    """((shard URL, j), image, caption) for the samples of ``split`` in the j-th run of
    ``batch_size`` consecutive ones of each shard, for the runs ``wanted[url]`` only; the others
    are never decoded. Positions count every sample of the split, broken ones included, as
    :func:`image_text_keys` lists them, so a batch is the same whoever reads it."""
    register_fsspec_openers()
    stages = _split_samples(list(urls), handler, held_out_fraction, split, split_nodes=False)
    return wds.DataPipeline(*stages, wds.map(_BatchOf(batch_size, wanted)),
                            wds.select(_in_a_batch),
                            wds.map(_DecodeInBatch(image_size), handler=handler))


def image_text_pairs(
    urls: str | list[str], *, image_size: int, handler: SkipBroken,
    held_out_fraction: float = 0.0, split: str = "train", resampled: bool = False,
    epoch_samples: Optional[int] = None, shuffle: int = 0, seed: int = 0,
    split_nodes: bool = True, keys: Optional[set[str]] = None,
) -> wds.DataPipeline:
    """(key, image uint8 [3, S, S], caption) pairs of ``urls`` (a list, or one brace URL such
    as ``s3://b/cc3m/{00000..00331}.tar``).

    ``split``: ``train`` (keys outside the held-out fraction) or ``test`` (inside it).
    ``resampled``: draw shards with replacement (open_clip's ``--dataset-resampled``; each
    worker draws its own, so no splitting); ``epoch_samples`` then bounds the stream
    (``with_epoch``), which a resampled stream needs. ``keys``: only these samples are decoded
    and kept.
    """
    register_fsspec_openers()
    shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    stages = _split_samples(shards, handler, held_out_fraction, split, split_nodes, resampled,
                            seed)
    if keys is not None:
        stages.append(wds.select(_Keys(keys)))
    if shuffle > 1:
        stages.append(wds.shuffle(shuffle, initial=min(shuffle, 100), rng=random.Random(seed)))
    stages.append(wds.map(_Decode(image_size), handler=handler))
    pipeline = wds.DataPipeline(*stages)
    if epoch_samples is not None:
        pipeline = pipeline.with_epoch(epoch_samples)
    return pipeline


def take(pairs: Iterator, limit: Optional[int] = None
         ) -> tuple[list[str], torch.Tensor, list[str]]:
    """The first ``limit`` pairs (all without a limit) as keys, uint8 images [N, 3, S, S] and
    captions."""
    keys, images, captions = [], [], []
    for key, image, caption in pairs:
        keys.append(key)
        images.append(image)
        captions.append(caption)
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise ShardError("no image-caption pairs in the shards (all broken, or none in "
                         "this split)")
    return keys, torch.stack(images), captions
