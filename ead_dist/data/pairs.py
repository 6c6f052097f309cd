"""Image-caption pairs of an image-text DATA as tensors: the model's inputs for a split.

Every shard ``meta.json`` lists (train and test alike: img2dataset data have no split of their
own) is streamed by :mod:`ead_dist.data.image_text_stream`; the held-out split is a hash of the
key (``image_text.held_out``), the train split the rest. Images come back normalised with the
dataset's mean and std, captions as open_clip token ids (:func:`dual_encoder.tokenize`).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..config import ImageTextConfig
from ..models.dual_encoder import tokenize
from .arrays import normalise
from .image_text_stream import (ShardError, SkipBroken, image_text_keys, image_text_pairs,
                                take)
from .meta import DatasetMeta, read_meta, shard_urls
from .reservoir import TooFewSamplesError, reservoir_positions

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


ShardMap = Callable[[Callable, list[tuple]], list]


def in_this_process(function: Callable, calls: list[tuple]) -> list:
    """The default :data:`ShardMap`: ``function(*call)`` for each call, here, in order."""
    return [function(*call) for call in calls]


def shard_split_count(url: str, settings: ImageTextConfig, split: str,
                      exclude: frozenset[str] = frozenset(), limit: int | None = None
                      ) -> tuple[int, dict[tuple[str, str], int]]:
    """How many pairs of ``split`` one shard lists (up to ``limit``), leaving out the keys
    ``exclude``; and the broken samples skipped while listing (:func:`_skipped`). No key is
    held."""
    handler = SkipBroken(limit=settings.max_broken_samples)
    keys = (key for key, _ in image_text_keys([url], held_out_fraction=settings.held_out,
                                                  handler=handler, split=split)
            if key not in exclude)
    count = sum(1 for _ in itertools.islice(keys, limit))
    return count, _skipped(url, handler)


def shard_pairs_at(url: str, settings: ImageTextConfig, split: str, offsets: list[int],
                   exclude: frozenset[str], image_size: int
                   ) -> tuple[list[str], dict[str, tuple[torch.Tensor, str]],
                              dict[tuple[str, str], int]]:
    """The pairs at ``offsets`` of one shard's ``split`` listing (``exclude`` left out): their
    keys in the order of ``offsets``, those that decode as key -> (image, caption), and the
    samples that did not decode (:func:`_skipped`; the listing's are the count's). Reads the
    shard twice: keys only, then the wanted samples decoded."""
    listing = SkipBroken(limit=settings.max_broken_samples)
    wanted, keys = set(offsets), {}
    listed = (key for key, _ in image_text_keys([url], held_out_fraction=settings.held_out,
                                                    handler=listing, split=split)
              if key not in exclude)
    for offset, key in enumerate(itertools.islice(listed, max(offsets) + 1)):
        if offset in wanted:
            keys[offset] = key
    decoding = SkipBroken(limit=settings.max_broken_samples)
    decoded = {key: (image, caption) for key, image, caption in image_text_pairs(
        [url], image_size=image_size, handler=decoding, held_out_fraction=settings.held_out,
        split=split, split_nodes=False, keys=set(keys.values()))}
    return [keys[offset] for offset in offsets], decoded, _skipped(url, decoding)


def _skipped(url: str, handler: SkipBroken) -> dict[tuple[str, str], int]:
    """(shard, reason) -> broken samples a one-shard handler skipped."""
    return {(url, reason): count for reason, count in handler.counts.items()}


def sample_pairs(data_url: str, settings: ImageTextConfig, split: str, count: int, seed: int,
                 limit: int | None = None, meta: DatasetMeta | None = None,
                 map_shards: ShardMap = in_this_process) -> Pairs:
    """``count`` pairs drawn uniformly (seeded) from the first ``limit`` pairs of ``split`` (all
    without one), shard by shard and never holding the split: each shard's pairs are counted
    without decoding, the positions drawn (:func:`reservoir_positions`, the draw reservoir
    sampling over the keys in shard order makes), and each shard holding some decodes its own.
    ``map_shards`` runs the per-shard calls (:data:`ShardMap`; Ray tasks in a run,
    ``stages/distill_pairs.py``), whose number never changes the draw. A drawn pair that does
    not decode is left out and the draw made again without it. TooFewSamplesError when the
    split has fewer."""
    meta = meta or read_meta(data_url)
    _require_image_text(data_url, meta)
    every = all_shards(data_url, meta)
    broken: dict[str, set[str]] = {}  # shard -> drawn keys that did not decode
    undecoded: Counter = Counter()  # (shard, reason) -> drawn samples that did not decode
    while True:
        exclude = [frozenset(broken.get(url, ())) for url in every]
        counts, skipped = _split_counts(every, settings, split, exclude, limit, map_shards)
        total = sum(counts) if limit is None else min(limit, sum(counts))
        try:
            positions = reservoir_positions(total, count, seed)
        except TooFewSamplesError:
            raise TooFewSamplesError(f"{data_url}: {count} {split} pairs asked for, and the "
                                     f"{split} split has fewer") from None
        located = [_locate(position, counts) for position in positions]
        offsets = _offsets_by_shard(located)
        calls = [(every[i], settings, split, sorted(wanted), exclude[i], meta.image_shape[1])
                 for i, wanted in offsets.items()]
        key_at, decoded = {}, {}
        for (shard, wanted), (keys, pairs, broken_here) in zip(
                offsets.items(), map_shards(shard_pairs_at, calls)):
            key_at.update(((shard, offset), key) for offset, key in zip(sorted(wanted), keys))
            decoded.update(pairs)
            undecoded.update(broken_here)
        keys = [key_at[place] for place in located]
        missing = [(i, key) for (i, _), key in key_at.items() if key not in decoded]
        if not missing:
            break
        for i, key in missing:
            broken.setdefault(every[i], set()).add(key)
    _check_skipped(skipped + undecoded, settings, data_url, split)
    return _as_pairs(keys, torch.stack([decoded[key][0] for key in keys]),
                     [decoded[key][1] for key in keys], meta, settings)


def _check_skipped(skipped: Counter, settings: ImageTextConfig, data_url: str,
                   split: str) -> None:
    """Log the broken samples a draw skipped, by reason; past
    ``image_text.max_broken_samples`` in all (each shard's own pass checks its part), a
    ShardError naming the shard with the most."""
    total = sum(skipped.values())
    if not total:
        return
    reasons, shards = Counter(), Counter()
    for (shard, reason), count in skipped.items():
        reasons[reason] += count
        shards[shard] += count
    limit = settings.max_broken_samples
    if limit is not None and total > limit:
        worst, most = shards.most_common(1)[0]
        raise ShardError(f"{data_url} {split}: {total} broken samples, more than "
                         f"image_text.max_broken_samples {limit}; most in shard {worst} "
                         f"({most}): {dict(reasons)}")
    log.warning("%s %s: skipped %d broken samples %s", data_url, split, total, dict(reasons))


def _split_counts(every: list[str], settings: ImageTextConfig, split: str,
                  exclude: list[frozenset[str]], limit: int | None, map_shards: ShardMap
                  ) -> tuple[list[int], Counter]:
    """Pairs per shard of ``split``, excluded keys left out: every shard through
    ``map_shards``, or with a ``limit`` the shards of the prefix here, one after another
    (those past it: 0). And the broken samples skipped, (shard, reason) -> count."""
    if limit is not None:
        return _prefix_counts(every, settings, split, exclude, limit)
    skipped: Counter = Counter()
    results = map_shards(shard_split_count, [(url, settings, split, left_out)
                                             for url, left_out in zip(every, exclude)])
    for _, broken_here in results:
        skipped.update(broken_here)
    return [count for count, _ in results], skipped


def _prefix_counts(urls: list[str], settings: ImageTextConfig, split: str,
                   exclude: list[frozenset[str]], limit: int | None
                   ) -> tuple[list[int], Counter]:
    """Pairs per shard of ``split`` in this process, one shard after another, counting only
    the first ``limit`` pairs of them all (the shards past it are not read: 0); and the broken
    samples skipped, (shard, reason) -> count."""
    counts, skipped, total = [], Counter(), 0
    for url, left_out in zip(urls, exclude):
        left = None if limit is None else limit - total
        count, broken_here = shard_split_count(url, settings, split, left_out, left) \
            if left != 0 else (0, {})
        counts.append(count)
        skipped.update(broken_here)
        total += count
    return counts, skipped


def _locate(position: int, counts: list[int]) -> tuple[int, int]:
    """(shard, offset in it) of a position in the shards' concatenated listing."""
    for shard, count in enumerate(counts):
        if position < count:
            return shard, position
        position -= count
    raise IndexError(f"position past the {sum(counts)} listed pairs")


def _offsets_by_shard(located: list[tuple[int, int]]) -> dict[int, set[int]]:
    """shard -> the offsets drawn in it, for the shards that hold any, in shard order."""
    by_shard: dict[int, set[int]] = {}
    for shard, offset in located:
        by_shard.setdefault(shard, set()).add(offset)
    return dict(sorted(by_shard.items()))


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
    urls = every if shards is None else [every[i] for i in shards]
    counts, skipped = _prefix_counts(urls, settings, split, [frozenset()] * len(urls), limit)
    _check_skipped(skipped, settings, data_url, split)
    return counts
