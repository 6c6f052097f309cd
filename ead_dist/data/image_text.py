"""CC3M and other img2dataset image-text shards: validate them in place and describe them.

img2dataset already writes WebDataset shards (``00000.tar`` with ``KEY.jpg``, ``KEY.txt``,
``KEY.json``), so nothing is converted: each shard is read once by its own Ray task, which
checks every sample decodes and has a caption and returns its count and pixel sums. The
result is ``DATA/meta.json`` listing the shards at their original URLs, split into train and a
held-out test part by shard.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import storage
from ..fingerprint import guard_ingest
from ..progress import progress_bar
from .meta import META_NAME, DatasetMeta, ShardInfo, SplitInfo, read_meta, write_meta
from .pipeline import ShardError, image_text_samples

log = logging.getLogger(__name__)


def shard_statistics(url: str, image_size: int, s3_options: dict | None = None) -> dict:
    """Count and per-channel pixel sums of one shard; raises ShardError on a bad sample.

    ``s3_options``: the driver's storage settings, applied first when this runs as a Ray task.
    """
    if s3_options is not None:
        storage.configure(s3_options)
    count = 0
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for _key, image, _caption in image_text_samples([url], image_size=image_size,
                                                   split_nodes=False):
        pixels = image.numpy().astype(np.float64) / 255.0
        total += pixels.sum(axis=(1, 2))
        total_sq += (pixels**2).sum(axis=(1, 2))
        count += 1
    return {"url": url, "count": count, "sum": total, "sum_sq": total_sq}


def ingest_image_text(
    name: str, source: str, data_url: str, *, image_size: int = 64, test_shards: int = 1,
    use_ray: bool = True,
) -> DatasetMeta:
    """Validate the ``*.tar`` shards under ``source`` and publish ``data_url/meta.json``."""
    guard_ingest(data_url, name, image_size)
    if storage.exists(storage.join(data_url, META_NAME)):
        meta = read_meta(data_url)
        log.info("%s is already described at %s", meta.name, data_url)
        return meta
    urls = storage.list_files(source, "*.tar")
    if len(urls) <= test_shards:
        raise ShardError(f"{source}: found {len(urls)} .tar shards, need more than "
                         f"test_shards={test_shards}")
    progress = progress_bar("validate shards", total=len(urls), unit="shard")
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(shard_statistics)
        s3_options = storage.current_options()
        pending = [task.remote(url, image_size, s3_options) for url in urls]
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
            progress.update(len(done))
    else:
        results = []
        for url in urls:
            results.append(shard_statistics(url, image_size))
            progress.update(1)
    progress.close()
    by_url = {r["url"]: r for r in results}
    pixels = sum(r["count"] for r in results) * image_size * image_size
    mean = sum(r["sum"] for r in results) / pixels
    std = np.sqrt(np.maximum(sum(r["sum_sq"] for r in results) / pixels - mean**2, 0.0))
    splits = {}
    for split, part in (("train", urls[:-test_shards]), ("test", urls[-test_shards:])):
        shards = [ShardInfo(url, by_url[url]["count"]) for url in part]
        splits[split] = SplitInfo(size=sum(s.count for s in shards), shards=shards)
    meta = DatasetMeta(name=name, task="image_text", image_shape=[3, image_size, image_size],
                       mean=mean.tolist(), std=std.tolist(), splits=splits)
    write_meta(data_url, meta)
    return meta
