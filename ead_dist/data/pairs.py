"""Image-caption pairs of an image-text DATA as tensors: the model's inputs for a split.

Every shard ``meta.json`` lists (train and test alike: img2dataset data have no split of their
own) is streamed by :mod:`ead_dist.data.image_text_stream`; the held-out split is a hash of the
key (``image_text.held_out``), the train split the rest. Images come back normalised with the
dataset's mean and std, captions as open_clip token ids (:func:`dual_encoder.tokenize`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import ImageTextConfig
from ..models.dual_encoder import tokenize
from .arrays import normalise
from .image_text_stream import SkipBroken, image_text_keys, image_text_pairs, take
from .meta import DatasetMeta, read_meta, shard_urls
from .reservoir import TooFewSamplesError, class_reservoirs

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    keys: list[str]
    images: torch.Tensor  # float32 [N, 3, S, S], normalised
    tokens: torch.Tensor  # int64 [N, L]
    captions: list[str]


def all_shards(data_url: str, meta: DatasetMeta) -> list[str]:
    return [url for split in sorted(meta.splits) for url in shard_urls(data_url, meta, split)]


def _require_image_text(data_url: str, meta: DatasetMeta) -> None:
    if meta.task != "image_text":
        raise ValueError(f"{data_url}: meta.json describes a {meta.task} dataset, not image-text")


def _pair_stream(data_url: str, settings: ImageTextConfig, split: str, meta: DatasetMeta,
                 **options) -> tuple[Iterator[tuple[str, torch.Tensor, str]], SkipBroken]:
    """(key, image, caption) of ``split`` over every shard, and the handler that skips broken
    samples up to ``settings.max_broken_samples`` (it counts them). ``options`` go to
    :func:`image_text_pairs` (resampled, shuffle, seed, split_nodes)."""
    _require_image_text(data_url, meta)
    handler = SkipBroken(limit=settings.max_broken_samples)
    stream = image_text_pairs(all_shards(data_url, meta), image_size=meta.image_shape[1],
                              handler=handler, held_out_fraction=settings.held_out, split=split,
                              **options)
    return stream, handler


def _as_pairs(keys: list[str], images: torch.Tensor, captions: list[str], meta: DatasetMeta,
              settings: ImageTextConfig) -> Pairs:
    return Pairs(keys, normalise(images, meta.mean, meta.std),
                 tokenize(captions, settings.context_length), captions)


def _report_skipped(handler: SkipBroken, data_url: str, split: str) -> None:
    if handler.skipped:
        log.warning("%s %s: skipped %d broken samples %s", data_url, split, handler.skipped,
                    dict(handler.counts))


def load_pairs(data_url: str, settings: ImageTextConfig, split: str, limit: int | None = None,
               meta: DatasetMeta | None = None) -> Pairs:
    """The first ``limit`` pairs (all without one) of ``split`` (``train`` or ``test``), in
    shard order; broken samples are skipped up to ``settings.max_broken_samples``."""
    meta = meta or read_meta(data_url)
    stream, handler = _pair_stream(data_url, settings, split, meta, split_nodes=False)
    keys, images, captions = take(stream, limit)
    _report_skipped(handler, data_url, split)
    return _as_pairs(keys, images, captions, meta, settings)


def sample_pairs(data_url: str, settings: ImageTextConfig, split: str, count: int, seed: int,
                 limit: int | None = None, meta: DatasetMeta | None = None) -> Pairs:
    """``count`` pairs drawn uniformly (seeded) from the first ``limit`` pairs of ``split`` (all
    without one) by reservoir sampling over their keys, read without decoding; then only the
    drawn pairs are decoded, from the shards that hold them. Holds ``count`` keys and pairs,
    never the split. A drawn pair that does not decode is left out and the draw made again
    without it. TooFewSamplesError when the split has fewer."""
    meta = meta or read_meta(data_url)
    _require_image_text(data_url, meta)
    every = all_shards(data_url, meta)
    decoding = SkipBroken(limit=settings.max_broken_samples)
    broken: set[str] = set()
    while True:
        listing = SkipBroken(limit=settings.max_broken_samples)  # each pass counts afresh
        listed = (pair for pair in image_text_keys(every, held_out_fraction=settings.held_out,
                                                   handler=listing, split=split)
                  if pair[0] not in broken)
        try:
            [chosen] = class_reservoirs(((0, pair) for pair in itertools.islice(listed, limit)),
                                        count, 1, seed)
        except TooFewSamplesError:
            raise TooFewSamplesError(f"{data_url}: {count} {split} pairs asked for, and the "
                                     f"{split} split has fewer") from None
        holding = {url for _, url in chosen}
        decoded = {key: (image, caption) for key, image, caption in image_text_pairs(
            [url for url in every if url in holding], image_size=meta.image_shape[1],
            handler=decoding, held_out_fraction=settings.held_out, split=split,
            split_nodes=False, keys={key for key, _ in chosen})}
        missing = {key for key, _ in chosen} - set(decoded)
        if not missing:
            break
        broken |= missing
    _report_skipped(listing, data_url, split)
    _report_skipped(decoding, data_url, split)
    keys = [key for key, _ in chosen]
    return _as_pairs(keys, torch.stack([decoded[key][0] for key in keys]),
                     [decoded[key][1] for key in keys], meta, settings)


def train_batches(data_url: str, settings: ImageTextConfig, batch_size: int, seed: int,
                  meta: DatasetMeta | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (normalised images [B, 3, S, S], tokens [B, L]) batches of the train split, drawn
    the way open_clip trains: shards resampled with replacement and pairs shuffled in a buffer
    of ``settings.stream_buffer``, both seeded by ``seed``; broken samples are skipped up to
    ``settings.max_broken_samples``. Holds one buffer and one batch, whatever the data's size."""
    meta = meta or read_meta(data_url)
    pairs, _ = _pair_stream(data_url, settings, "train", meta, resampled=True,
                            shuffle=settings.stream_buffer, seed=seed)
    images, captions = [], []
    for _key, image, caption in pairs:
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            yield (normalise(torch.stack(images), meta.mean, meta.std),
                   tokenize(captions, settings.context_length))
            images, captions = [], []


def split_counts(data_url: str, settings: ImageTextConfig, split: str, limit: int | None = None,
                 meta: DatasetMeta | None = None, shards: list[int] | None = None) -> list[int]:
    """How many pairs of ``split`` each shard numbered ``shards`` (all by default) holds, in
    order, counting only the first ``limit`` pairs of them all (the shards past the limit are
    not read: 0); from the tar files without decoding (:func:`image_text_keys`), holding no
    key."""
    meta = meta or read_meta(data_url)
    every = all_shards(data_url, meta)
    numbers = range(len(every)) if shards is None else shards
    handler = SkipBroken(limit=settings.max_broken_samples)
    counts, total = [], 0
    for i in numbers:
        left = None if limit is None else limit - total
        if left == 0:
            counts.append(0)
            continue
        keys = image_text_keys([every[i]], held_out_fraction=settings.held_out,
                               handler=handler, split=split)
        count = sum(1 for _ in itertools.islice(keys, left))
        counts.append(count)
        total += count
    return counts
