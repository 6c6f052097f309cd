"""Teach WebDataset to open shard URLs on every storage scheme through fsspec, in one place.

WebDataset 1.0 has no ``s3://`` (or ``memory://``) opener and raises "no gopen handler
defined" (webdataset#184). We register one opener that goes through :mod:`ead_dist.storage`,
so local and object-store shards are read by the same code. The filesystem is created inside
the calling process (s3fs is not fork-safe), which this gives us for free: fsspec's instance
cache is per process.
"""

from __future__ import annotations

import webdataset as wds

from .. import storage

FSSPEC_SCHEMES = ("s3", "s3a", "memory", "gcs", "gs", "az", "abfs", "file")


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"shards are opened read-only, got mode {mode!r} for {url}")
    return storage.open_read(url)


def register_fsspec_openers() -> None:
    """Route the storage schemes WebDataset lacks (or handles by shelling out) to fsspec."""
    for scheme in FSSPEC_SCHEMES:
        wds.gopen_schemes[scheme] = _open_with_fsspec
