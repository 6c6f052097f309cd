"""The Fashion-MNIST scene captions: img2dataset's layout, captions that say the layout."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ead_dist import storage
from ead_dist.data.caption_scenes import (
    COLOURS,
    ITEM_NAMES,
    describe,
    draw_layout,
    write_caption_scenes,
)


def _items(count: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(count) % len(ITEM_NAMES)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 6:22, 6:22] = rng.integers(128, 256, (count, 16, 16))
    return images, labels


def test_caption_names_every_item_in_quadrant_order():
    items = draw_layout(np.random.default_rng(3))
    caption = describe(items)
    assert 2 <= len(items) <= 3
    for item in items:
        assert f"{item.size} {item.colour} {ITEM_NAMES[item.kind]}" in caption
    assert caption.count(" at the ") == len(items)


def test_shards_have_img2dataset_layout(tmp_path):
    images, labels = _items()
    urls = write_caption_scenes(str(tmp_path), images, labels, samples=25, shard_size=10,
                                canvas=48, seed=1)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    assert (tmp_path / "00001.parquet").exists() and (tmp_path / "00002_stats.json").exists()
    with tarfile.open(urls[1]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"]
        assert len(names) == 30
        jpeg = tar.extractfile("000010003.jpg").read()
        caption = tar.extractfile("000010003.txt").read().decode()
        record = json.loads(tar.extractfile("000010003.json").read())
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (48, 48)
    assert record["key"] == "000010003" and record["caption"] == caption
    assert record["status"] == "success"
    # the caption's colours are in the picture: the tinted item's pixels lean to its colour
    for entry in record["layout"]:
        assert entry["colour"] in COLOURS and entry["item"] in caption


def test_scenes_are_a_function_of_seed(tmp_path):
    images, labels = _items()
    a = write_caption_scenes(str(tmp_path / "a"), images, labels, samples=5, seed=2)
    b = write_caption_scenes(str(tmp_path / "b"), images, labels, samples=5, seed=2)
    c = write_caption_scenes(str(tmp_path / "c"), images, labels, samples=5, seed=3)
    assert storage.read_bytes(a[0]) == storage.read_bytes(b[0])
    assert storage.read_bytes(a[0]) != storage.read_bytes(c[0])


@pytest.mark.s3
def test_written_to_s3(s3_bucket):
    images, labels = _items()
    urls = write_caption_scenes(f"{s3_bucket}/scenes", images, labels, samples=12,
                                shard_size=6)
    assert urls == [f"{s3_bucket}/scenes/00000.tar", f"{s3_bucket}/scenes/00001.tar"]
    assert len(storage.list_files(f"{s3_bucket}/scenes", "*.tar")) == 2
